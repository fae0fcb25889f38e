"""`t2i-eval explore` / `app.py`: a Gradio side-by-side explorer over the runs in one folder.

Safety of the server: it binds to 127.0.0.1 unless told otherwise, never makes a share link,
sends no analytics, loads no font or script from the network (system fonts, no SSR), and serves
no file by path. Gradio is given no `allowed_paths`; run images come from the explorer's own
route, which maps (run, record id) to the record's image through the store; images of the live
tab are sent inline. An allow-list (`PAGE_ROUTES`) answers 403 to every other route Gradio
mounts (its file, proxy and upload routes among them), so a route a later Gradio adds is closed
until someone opens it here. Gradio's upload and cache folders live in a private temporary
folder, never in the working directory or the `/tmp/gradio` every Gradio app on a machine shares.

Speed and memory with 100,000-record runs: each run is read through its index (`run_index`,
built once and kept in the run directory, rebuilt when the run's files change), so the server
holds no records; A and B are paired once per (A, B) in a temporary on-disk table; a filter or
search is one SQL query and a page reads the records of its 20 rows (images loaded lazily by the
browser). Torch is imported only when the live tab runs a prompt.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingExtra, UserError
from ..types import LABELS, category_order
from .render import live_html, render_rows, run_facts
from .rows import (
    ANY,
    IMAGE_ROUTE,
    OUTCOME_FILTERS,
    PAGE_SIZE,
    SIDES,
    Filters,
    Pairing,
    RunView,
    ViewCache,
    find_runs,
    page_of,
    read_image,
    summary_rows,
)

NONE = "(none)"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

CSS = """
.rows{border-collapse:collapse;width:100%;font-size:13px}
.rows td,.rows th{border:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
.rows td.prompt{max-width:360px}.rows .meta{color:#666;font-size:11px;margin-top:4px}
.rows img{display:block;width:128px;height:128px;object-fit:contain;background:#eee}
.noimg{width:128px;height:40px;color:#888;font-size:11px}
.outcome{font-weight:600;margin-top:4px}.o-complied{color:#2e7d32}.o-refused{color:#c62828}
.o-blocked{color:#1565c0}.o-sanitized{color:#6a1b9a}.o-error{color:#ef6c00}
.reasons{margin:2px 0 0 1em;padding:0;font-size:11px;color:#444}
.record pre{white-space:pre-wrap;font-size:11px;max-height:320px;overflow:auto}
.facts{font-size:13px;margin:4px 0}.warn{background:#fff3cd;padding:2px 4px}
.live td,.live th{border:1px solid #ddd;padding:4px 8px;font-size:13px}
"""


@functools.cache
def private_gradio_folder() -> Path:
    """This process's folder for Gradio's uploads and caches (mode 0700, removed at exit).

    Gradio's defaults are `/tmp/gradio`, shared by every Gradio app on the machine, and
    `.gradio/` under the working directory, which lands inside RUNS_DIR for `explore .`."""
    folder = Path(tempfile.mkdtemp(prefix="t2i-eval-explorer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Set, not defaulted: a shared folder named by the environment is what this avoids. Before
    # the import, since some Gradio modules read these once when imported.
    private = private_gradio_folder()
    os.environ["GRADIO_TEMP_DIR"] = str(private / "uploads")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(private / "examples")
    try:
        import gradio as gr
    except ImportError:
        raise MissingExtra("the explorer", "gradio", "app") from None
    return gr


class Explorer:
    """The state behind the page: the runs folder, open run views and the current pairing."""

    def __init__(self, runs_dir: str | Path) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        find_runs(self.runs_dir)  # a clear error now rather than an empty page
        self.views = ViewCache(self.runs_dir)
        self._pairing: Pairing | None = None
        self._lock = threading.Lock()

    def runs(self) -> list[str]:
        return find_runs(self.runs_dir)

    def pair(self, a: str, b: str | None) -> Pairing:
        """The pairing of runs A and B (B may be None), kept until either changes. Call with
        the lock held: the pairing is one SQLite connection."""
        va = self.views.get(a)
        vb = self.views.get(b) if b and b != NONE else None
        p = self._pairing
        if p is None or p.a is not va or p.b is not vb:
            if p is not None:
                p.close()
            self._pairing = None  # one pairing kept (bounded memory and temporary disk)
            self._pairing = p = Pairing(va, vb)
        return p

    def page(
        self,
        a: str | None,
        b: str | None,
        category: str,
        label: str,
        wanted: str,
        side: str,
        text: str,
        page: float | None,
    ) -> tuple[str, int, str]:
        """(rows HTML, page number, "page i of n · k rows") for the current filters."""
        if not a:
            return "<p class='empty'>Pick run A.</p>", 1, ""
        filters = Filters(category, label, wanted, side, text or "")
        with self._lock:
            pairing = self.pair(a, b)
            hits = pairing.count(filters)
            page_no, pages, offset = page_of(hits, int(page or 1), PAGE_SIZE)
            shown = pairing.rows(filters, offset, PAGE_SIZE)
        info = f"page {page_no} of {pages} · {hits} matching rows of {pairing.total}"
        return render_rows(shown, pairing.a, pairing.b, pairing.total), page_no, info

    def image(self, run: str, record_id: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of a record's image, or None. `run` must be one of the runs
        found under the runs directory and `record_id` one of its records: both come from a
        visitor, so neither is ever joined onto a path."""
        if run not in self.runs():
            return None
        with self._lock:
            view = self.views.get(run)
            return read_image(view, record_id)

    def summary(self, a: str | None, b: str | None) -> tuple[str, list[list[str]], Any, list[str]]:
        """(facts HTML, summary table rows, chart, categories present) for runs A and B."""
        if not a:
            return "", [], None, ["all"]
        with self._lock:
            pairing = self.pair(a, b)
        views = [v for v in (pairing.a, pairing.b) if v is not None]
        table = [row for v in views for row in summary_rows(v)]
        ordered = category_order(c for v in views for c in v.summary().categories)
        return "".join(run_facts(v) for v in views), table, summary_chart(views), ["all", *ordered]


def summary_chart(views: list[RunView]) -> Any:
    """Grouped bars per category: benign over-refusal and unsafe refusal of A (and B), with
    Wilson intervals as error bars."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state across requests
    except ImportError:
        return None
    tables = [(v.name, v.summary()) for v in views]
    cats = category_order(c for _, t in tables for c in t.categories)
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / max(len(tables), 1)
    for ax, label, title in zip(
        axes, LABELS, ("benign over-refusal", "unsafe refusal"), strict=True
    ):
        for i, (name, t) in enumerate(tables):
            cells = [t.cell(c, label) for c in cats]  # stats.ClusteredRate each
            rates = [c.rate if c.n else 0.0 for c in cells]
            lo = [max(0.0, r - c.ci[0]) if c.n else 0.0 for r, c in zip(rates, cells, strict=True)]
            hi = [max(0.0, c.ci[1] - r) if c.n else 0.0 for r, c in zip(rates, cells, strict=True)]
            xs = [k + i * width for k in range(len(cats))]
            ax.bar(xs, rates, width, yerr=[lo, hi], capsize=2, label=f"{'AB'[i]}: {name}")
        ax.set_title(title)
        ax.set_xticks([k + width * (len(tables) - 1) / 2 for k in range(len(cats))])
        ax.set_xticklabels(cats, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share refused (95% Wilson CI)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


class LiveRunner:
    """Runs one typed prompt through one of the systems the owner allowed at launch.

    Visitors pick from that list only (checked here, on the server, since Gradio's API can be
    called directly): a free-text system would let anyone who reaches the page load any model,
    spend the owner's API keys, or send environment variables to a URL of their choosing through
    an `http` spec. The most recently used system is kept built (building loads models); torch is
    imported only here.
    """

    def __init__(self, allowed: list[str]) -> None:
        from ..systems import parse_system, validate_spec

        if not allowed:
            raise UserError("the live tab needs at least one system (--live-system)")
        for ref in allowed:  # a typo fails at start-up, not at a visitor's first click
            validate_spec(parse_system(ref))
        self.allowed = list(dict.fromkeys(allowed))
        self._built: tuple[str, Any] | None = None
        self._lock = threading.Lock()

    def run(self, prompt: str, system: str, seed: float | None) -> str:
        from ..systems import build_system, parse_system
        from ..systems.chain import WorkItem
        from ..types import content_id

        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("type a prompt first")
        if system not in self.allowed:
            raise UserError(f"system {system!r} is not offered here ({', '.join(self.allowed)})")
        with self._lock:  # one generation at a time: models are not thread-safe
            if self._built is None or self._built[0] != system:
                self._built = None  # free the previous system's models first
                self._built = (system, build_system(parse_system(system)))
            sys_ = self._built[1]
            seed_i = int(seed or 0)
            (res,) = sys_.run([WorkItem(content_id(prompt, str(seed_i)), "live", prompt, seed_i)])
        return live_html(res, sys_)


def build_app(runs_dir: str | Path, live_systems: list[str] | None = None) -> Any:
    """The Gradio Blocks of the explorer (not launched). `live_systems`: what the live tab may
    run (default: the offline `default`)."""
    gr = _gradio()
    ex = Explorer(runs_dir)
    live = LiveRunner(live_systems or ["default"])
    runs = ex.runs()
    first = runs[0] if runs else None

    with gr.Blocks(title="t2i-eval explorer", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## t2i-eval explorer\nRuns under `{ex.runs_dir}` ({len(runs)} found). Rows of A and B "
            "are matched by prompt and seed."
        )
        with gr.Tab("Compare"):
            with gr.Row():
                run_a = gr.Dropdown(runs, value=first, label="run A", elem_id="run-a")
                run_b = gr.Dropdown([NONE, *runs], value=NONE, label="run B", elem_id="run-b")
                refresh = gr.Button("refresh run list", scale=0)
            facts = gr.HTML(elem_id="facts")
            with gr.Row():
                category = gr.Dropdown(["all"], value="all", label="category", elem_id="f-cat")
                label = gr.Dropdown(["all", *LABELS], value="all", label="label", elem_id="f-label")
                wanted = gr.Dropdown(
                    list(OUTCOME_FILTERS), value=ANY, label="outcome", elem_id="f-outcome"
                )
                side = gr.Dropdown(list(SIDES), value="A or B", label="in", elem_id="f-side")
                text = gr.Textbox(label="search prompt text", elem_id="f-text")
            with gr.Row():
                prev_b = gr.Button("◀ previous", scale=0, elem_id="prev")
                page = gr.Number(1, label="page", precision=0, minimum=1, elem_id="page")
                info = gr.Markdown(elem_id="page-info")
                next_b = gr.Button("next ▶", scale=0, elem_id="next")
            rows = gr.HTML(elem_id="rows")
            with gr.Accordion("per-category summary", open=True):
                chart = gr.Plot(label="refusal by category", elem_id="chart")
                summary = gr.Dataframe(
                    headers=["run", "category", "benign over-refusal", "unsafe refusal"],
                    interactive=False,
                    elem_id="summary",
                )
        with gr.Tab("Live"):
            gr.Markdown(
                "Type a prompt and run it through one of the systems this explorer was started "
                "with (`--live-system`): each stage's decision, with its component's weights "
                "(`random` = a random-weight stand-in), and the image."
            )
            with gr.Row():
                live_prompt = gr.Textbox(label="prompt", elem_id="live-prompt", scale=3)
                live_sys = gr.Dropdown(
                    live.allowed, value=live.allowed[0], label="system", elem_id="live-system"
                )
                live_seed = gr.Number(0, label="seed", precision=0, elem_id="live-seed")
            live_go = gr.Button("run", variant="primary", elem_id="live-run")
            live_out = gr.HTML(elem_id="live-out")

        filters = [run_a, run_b, category, label, wanted, side, text]

        def show(a, b, cat, lab, want, sd, txt, pg):
            try:
                return ex.page(a, b, cat, lab, want, sd, txt, pg)
            except UserError as e:
                raise gr.Error(str(e)) from None

        def first_page(*args):
            return show(*args, 1)

        def step(delta):
            def go(*args):
                *rest, pg = args
                return show(*rest, (pg or 1) + delta)

            return go

        def pick_runs(a, b):
            try:
                html_facts, table, fig, cats = ex.summary(a, b)
            except UserError as e:
                raise gr.Error(str(e)) from None
            return html_facts, table, fig, gr.update(choices=cats, value="all")

        def refresh_runs():
            found = ex.runs()
            return gr.update(choices=found), gr.update(choices=[NONE, *found])

        def run_live(prompt, system, seed):
            try:
                return live.run(prompt, system, seed)
            except UserError as e:
                raise gr.Error(str(e)) from None

        out = [rows, page, info]
        for comp in (run_a, run_b):
            comp.change(pick_runs, [run_a, run_b], [facts, summary, chart, category]).then(
                first_page, filters, out
            )
        for comp in (label, wanted, side, category):
            comp.change(first_page, filters, out)
        text.input(first_page, filters, out, trigger_mode="always_last")
        page.submit(show, [*filters, page], out)
        prev_b.click(step(-1), [*filters, page], out)
        next_b.click(step(+1), [*filters, page], out)
        refresh.click(refresh_runs, None, [run_a, run_b])
        live_go.click(run_live, [live_prompt, live_sys, live_seed], live_out)
        live_prompt.submit(run_live, [live_prompt, live_sys, live_seed], live_out)
        # rows first: they are what a visitor waits for (the chart is drawn after them)
        demo.load(first_page, filters, out).then(
            pick_runs, [run_a, run_b], [facts, summary, chart, category]
        )
    demo.t2i_explorer = ex  # launch() serves its images
    return demo


def free_port(host: str) -> int:
    """A port nothing listens on now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: The routes the page needs, as (method, path template) of the mounted app: the page, Gradio's
#: own bundled scripts, styles and icons (from its package folders; no path outside them), and
#: the queue that runs events. Everything else Gradio mounts answers 403 (`PageOnly`).
PAGE_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/"),
        ("HEAD", "/"),
        ("GET", "/assets/{path:path}"),
        ("GET", "/static/{path:path}"),
        ("GET", "/favicon.ico"),
        ("GET", "/theme.css"),
        ("GET", "/gradio_api/startup-events"),
        ("POST", "/gradio_api/queue/join"),
        ("GET", "/gradio_api/queue/data"),
        ("GET", "/gradio_api/heartbeat/{session_hash}"),
        ("POST", "/gradio_api/cancel"),
        ("GET", "/" + IMAGE_ROUTE),
    }
)
_ANY_PATH = re.compile(".*")


@dataclass(frozen=True)
class MountedRoute:
    """One route of the mounted app, with its full path template, in dispatch order."""

    template: str
    """Path template with every enclosing prefix, e.g. `/gradio_api/file/{path:path}`."""
    scope: str
    """`http`, `websocket`, or `any` (a mounted app the walk cannot look into)."""
    methods: frozenset[str] | None
    """HTTP methods it answers; None: all."""
    regex: re.Pattern[str]


def mounted_routes(routes: Iterable[Any], prefix: str = "") -> list[MountedRoute]:
    """Every route under `routes`, flattened through mounts and included routers, in the order
    Starlette tries them. A mounted app with no route list (static files, a sub-application)
    becomes one route matching everything under its prefix, so nothing is served unlisted."""
    from starlette.routing import Mount, WebSocketRoute, compile_path

    out: list[MountedRoute] = []
    for route in routes:
        inner = getattr(route, "original_router", None)  # a router FastAPI included as one route
        if inner is not None:
            more = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            out += mounted_routes(inner.routes, prefix + more)
        elif isinstance(route, Mount) and route.routes:
            out += mounted_routes(route.routes, prefix + route.path)
        elif isinstance(route, Mount) or not hasattr(route, "path"):
            path = prefix + getattr(route, "path", "")
            out.append(MountedRoute(path + "/{path:path}", "any", None, _prefix_regex(path)))
        else:
            template = prefix + route.path
            kind = "websocket" if isinstance(route, WebSocketRoute) else "http"
            methods = getattr(route, "methods", None)
            regex = compile_path(template)[0]
            out.append(MountedRoute(template, kind, frozenset(methods) if methods else None, regex))
    return out


def _prefix_regex(path: str) -> re.Pattern[str]:
    return re.compile(re.escape(path) + "(/.*)?$") if path else _ANY_PATH


def dispatched(table: list[MountedRoute], kind: str, method: str, path: str) -> MountedRoute | None:
    """The route Starlette would hand this request to: the first whose path and method match."""
    for r in table:
        answers = kind != "http" or r.methods is None or method in r.methods
        if r.scope in (kind, "any") and answers and r.regex.match(path):
            return r
    return None


def page_route(table: list[MountedRoute], kind: str, method: str, path: str) -> bool:
    """Whether the request reaches a route the page needs (`PAGE_ROUTES`)."""
    r = dispatched(table, kind, method, path)
    return r is not None and r.scope == kind == "http" and (method, r.template) in PAGE_ROUTES


class PageOnly:
    """ASGI middleware in front of the whole Gradio app: a request that Gradio would route to
    anything but `PAGE_ROUTES` gets 403, decided on the app's own route table (read once, at the
    first request, from the app itself) rather than on patterns of the URL."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._table: list[MountedRoute] | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        from starlette._utils import get_route_path  # what the router itself matches against

        if self._table is None:
            self._table = mounted_routes(scope["app"].routes)
        method = scope.get("method", "")
        if page_route(self._table, scope["type"], method, get_route_path(scope)):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await _send_text(send, 403, "t2i-eval explorer: not a route of this page\n")


async def _send_text(send: Any, status: int, text: str) -> None:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


#: Sent with every run image: never sniffed as anything else, nothing it may load or run, and
#: no other site may embed it.
IMAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


def image_route(ex: Explorer) -> Any:
    """`GET /t2i-eval/run-image?run=RUN&record=RECORD_ID`: the record's image, or 404."""
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    def serve(request: Any) -> Any:
        found = ex.image(
            request.query_params.get("run", ""), request.query_params.get("record", "")
        )
        if found is None:
            return PlainTextResponse("no such image\n", 404, {"X-Content-Type-Options": "nosniff"})
        data, kind = found
        return Response(data, media_type=kind, headers=IMAGE_HEADERS)

    return Route("/" + IMAGE_ROUTE, serve, methods=["GET"])


def app_kwargs(ex: Explorer) -> dict[str, Any]:
    """What the explorer adds to the app Gradio builds: its image route and `PageOnly`."""
    from starlette.middleware import Middleware

    return {"routes": [image_route(ex)], "middleware": [Middleware(PageOnly)]}


def launch(
    runs_dir: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    live_systems: list[str] | None = None,
    block: bool = True,
) -> tuple[Any, str]:
    """Serve the explorer; returns (blocks, url). With `block` it serves until Ctrl-C."""
    gr = _gradio()
    if port is not None and not 0 < port < 65536:
        raise UserError(f"--port {port}: expected 1..65535")
    if ":" in host:
        raise UserError(f"--host {host}: IPv6 literals are not supported; use 127.0.0.1")
    demo = build_app(runs_dir, live_systems)
    runs = demo.t2i_explorer.runs_dir
    if host not in LOOPBACK:
        print(
            f"explorer: WARNING: serving on {host}: anyone who can reach this machine can read "
            f"the runs under {runs} and run the live tab's systems"
        )
    theme = gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    try:
        port = port or free_port(host)
        _, url, _ = demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            prevent_thread_lock=True,
            max_file_size=0,  # the explorer takes no uploads (and PageOnly closes the route)
            app_kwargs=app_kwargs(demo.t2i_explorer),
            quiet=True,
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
            footer_links=[],
            theme=theme,
            css=CSS,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"explorer: cannot serve on {host}:{port} ({e})") from None
    print(f"explorer: {url} (runs from {runs}; Ctrl-C to stop)", flush=True)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo, url
