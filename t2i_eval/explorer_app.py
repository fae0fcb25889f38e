"""`t2i-eval explore` / `app.py`: a Gradio side-by-side explorer over the runs in one folder.

Safety of the server: it binds to 127.0.0.1 unless told otherwise, never makes a share link,
sends no analytics, loads no font or script from the network (system fonts, no SSR), and serves
files from the runs directory only (Gradio's `allowed_paths`; images of the live tab are sent
inline, so no other file is ever written for serving).

Speed with 10,000-record runs: runs are read once and cached until their files change, rows are
paired once per (A, B), a filter touches only the row table (one page of rows, images loaded
lazily by the browser), and torch is imported only when the live tab runs a prompt.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import threading
from pathlib import Path
from typing import Any

from .errors import MissingExtra, UserError
from .explorer import (
    OUTCOME_FILTERS,
    PAGE_SIZE,
    SIDES,
    Row,
    RunView,
    ViewCache,
    filter_rows,
    find_runs,
    page_of,
    pair_rows,
    render_rows,
    run_facts,
    summary_rows,
)
from .stats import CATEGORIES

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


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError:
        raise MissingExtra("the explorer", "gradio", "app") from None
    return gr


class Explorer:
    """The state behind the page: the runs folder, cached run views and paired rows."""

    def __init__(self, runs_dir: str | Path) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        find_runs(self.runs_dir)  # a clear error now rather than an empty page
        self.views = ViewCache(self.runs_dir)
        self._pairs: dict[tuple[int, int], tuple[RunView, RunView | None, list[Row]]] = {}
        self._lock = threading.Lock()

    def runs(self) -> list[str]:
        return find_runs(self.runs_dir)

    def pair(self, a: str, b: str | None) -> tuple[RunView, RunView | None, list[Row]]:
        with self._lock:
            va = self.views.get(a)
            vb = self.views.get(b) if b and b != NONE else None
            key = (id(va), id(vb))
            if key not in self._pairs:
                # One pairing kept (bounded memory); it holds its views so their ids stay unique.
                self._pairs = {key: (va, vb, pair_rows(va, vb))}
            return self._pairs[key]

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
        va, vb, rows = self.pair(a, b)
        hits = filter_rows(rows, category, label, wanted, side, text or "")
        shown, page_no, pages = page_of(hits, int(page or 1), PAGE_SIZE)
        info = f"page {page_no} of {pages} · {len(hits)} matching rows of {len(rows)}"
        return render_rows(shown, va, vb, self.runs_dir, len(rows)), page_no, info

    def summary(self, a: str | None, b: str | None) -> tuple[str, list[list[str]], Any, list[str]]:
        """(facts HTML, summary table rows, chart, categories present) for runs A and B."""
        if not a:
            return "", [], None, ["all"]
        va, vb, _ = self.pair(a, b)
        views = [v for v in (va, vb) if v is not None]
        table = [row for v in views for row in summary_rows(v)]
        cats = {c for v in views for c in v.table().categories}
        ordered = [c for c in CATEGORIES if c in cats] + sorted(cats - set(CATEGORIES))
        return "".join(run_facts(v) for v in views), table, summary_chart(views), ["all", *ordered]


def summary_chart(views: list[RunView]) -> Any:
    """Grouped bars per category: benign over-refusal and unsafe refusal of A (and B), with
    Wilson intervals as error bars."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state across requests
    except ImportError:
        return None
    tables = [(v.name, v.table()) for v in views]
    cats = [c for c in CATEGORIES if any(c in t.categories for _, t in tables)]
    cats += sorted({c for _, t in tables for c in t.categories} - set(CATEGORIES))
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / max(len(tables), 1)
    for ax, label, title in zip(
        axes, ("benign", "unsafe"), ("benign over-refusal", "unsafe refusal"), strict=True
    ):
        for i, (name, t) in enumerate(tables):
            cells = [t.cell(c, label) for c in cats]
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
        from .systems import parse_system, validate_spec

        if not allowed:
            raise UserError("the live tab needs at least one system (--live-system)")
        for ref in allowed:  # a typo fails at start-up, not at a visitor's first click
            validate_spec(parse_system(ref))
        self.allowed = list(dict.fromkeys(allowed))
        self._built: tuple[str, Any] | None = None
        self._lock = threading.Lock()

    def run(self, prompt: str, system: str, seed: float | None) -> str:
        from .systems import build_system, parse_system
        from .systems.base import WorkItem
        from .types import content_id

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


def _png_data_uri(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def live_html(res: Any, system: Any) -> str:
    """Each stage's decision with its score and threshold, then the image (sent inline)."""
    from .explorer import _e, _num

    weights = {n: getattr(c, "weights", "?") for _, c in system.components() for n in [c.name]}
    rows = "".join(
        f"<tr><td>{_e(d.stage)}</td><td>{_e(d.name)} ({_e(weights.get(d.name, '?'))})</td>"
        f"<td>{'refused' if d.refused else 'passed' if d.refused is False else 'could not check'}"
        f"</td><td>{_num(d.score)}</td><td>{_num(d.threshold)}</td><td>{_e(d.message)}</td></tr>"
        for d in res.decisions
    )
    verdict = {"ok": "delivered", "refused": f"refused by {res.refused_by}", "error": "error"}
    head = f"<p class='live-status'><b>{_e(verdict.get(res.status, res.status))}</b>"
    if res.error:
        head += f": {_e(res.error)}"
    if res.delivered == "black":
        head += " (the user would get a black image; the unfiltered image is shown)"
    img = (
        f"<img class='live-image' src='{_png_data_uri(res.image)}' width='256' alt='image'>"
        if res.image is not None
        else "<p>no image</p>"
    )
    return (
        f"{head}</p><table class='live'><tr><th>stage</th><th>component</th><th>decision</th>"
        f"<th>score</th><th>threshold</th><th>message</th></tr>{rows}</table>{img}"
    )


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
                label = gr.Dropdown(
                    ["all", "benign", "unsafe"], value="all", label="label", elem_id="f-label"
                )
                wanted = gr.Dropdown(
                    list(OUTCOME_FILTERS), value="any", label="outcome", elem_id="f-outcome"
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
        demo.load(pick_runs, [run_a, run_b], [facts, summary, chart, category]).then(
            first_page, filters, out
        )
    demo.t2i_runs_dir = ex.runs_dir  # launch() confines file serving to it
    return demo


def free_port(host: str) -> int:
    """A port nothing listens on now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: All the explorer's pages load through Gradio's file route: the runs' images.
SERVED_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_FILE_ROUTE = "/file="


def file_request_allowed(path: str) -> bool:
    """Whether a request path may reach Gradio's `file=` route (any other path may).

    Gradio serves every file type under `allowed_paths` inline with its own MIME type, so an
    HTML page inside a run folder (one's own report, or a run folder from someone else) would
    run script in the explorer's origin, where the live tab is; and the same route fetches any
    public http(s) URL on a visitor's behalf. The explorer needs neither: only images pass."""
    i = path.find(_FILE_ROUTE)
    if i < 0:
        return True
    target = path[i + len(_FILE_ROUTE) :]
    if "://" in target or target.lower().startswith(("http:", "https:", "//")):
        return False
    return target.lower().endswith(SERVED_SUFFIXES)


class OnlyRunImages:
    """ASGI middleware in front of the whole Gradio app: applies `file_request_allowed`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not file_request_allowed(scope.get("path", "")):
            body = b"t2i-eval explorer: only run images are served\n"
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _blocked_folders() -> list[Path]:
    """Folders Gradio serves besides `allowed_paths` (its upload folder, shared by every Gradio
    app on the machine, and the examples cache): blocked, so only RUNS_DIR is served."""
    from gradio import utils as gu

    return [Path(gu.get_upload_folder()).resolve(), Path(gu.get_cache_folder()).resolve()]


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
    runs = Path(demo.t2i_runs_dir)
    blocked = _blocked_folders()
    if any(runs.is_relative_to(b) or b.is_relative_to(runs) for b in blocked):
        raise UserError(
            f"{runs}: overlaps Gradio's upload or cache folder ({', '.join(map(str, blocked))}); "
            "keep runs elsewhere"
        )
    if host not in LOOPBACK:
        print(
            f"explorer: WARNING: serving on {host}: anyone who can reach this machine can read "
            f"the runs under {runs} and run the live tab's systems"
        )
    from starlette.middleware import Middleware

    theme = gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    try:
        port = port or free_port(host)
        _, url, _ = demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            prevent_thread_lock=True,
            allowed_paths=[str(runs)],
            blocked_paths=[str(b) for b in blocked],
            max_file_size=0,  # the explorer takes no uploads
            app_kwargs={"middleware": [Middleware(OnlyRunImages)]},
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
