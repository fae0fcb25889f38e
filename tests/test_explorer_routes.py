"""The explorer's server, route by route: only run images leave it, through its own image route.

A launched explorer (127.0.0.1, no browser) is asked for planted files (HTML, SVG, text, a run's
manifest and HTML report, a file outside the runs folder, a real run image) through every route
its app mounts, and for URLs of a local server that records whether anything called it.
"""

from __future__ import annotations

import http.client
import http.server
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from t2i_eval.cli import main

MARK = "T2I-PLANTED"
"""In every planted file: a response carrying it served the file."""
PARAM = re.compile(r"\{[^}]+\}")
#: Gradio's routes that serve a file or fetch a URL (as of Gradio 6): the enumeration must find
#: them, so a walk that misses routes cannot pass by testing fewer.
KNOWN_FILE_ROUTES = {
    "/gradio_api/file={path_or_url:path}",
    "/gradio_api/file/{path:path}",
    "/gradio_api/proxy={url_path:path}",
    "/gradio_api/upload",
}


def _fake_run(out: Path, system: str) -> Path:
    assert main(["run", "--system", system, "--limit", "6", "-q", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two fake runs, a run's HTML report, and planted files inside and outside the runs folder."""
    from t2i_eval.report.html import write_html

    base = tmp_path_factory.mktemp("routes")
    runs = base / "runs"
    _fake_run(runs / "a", "blocklist>fake")
    _fake_run(runs / "b", "fake")
    write_html([runs / "a"])  # runs/a/report/html/index.html
    report = runs / "a" / "report" / "html" / "index.html"
    report.write_text(report.read_text() + f"<!-- {MARK} --><script>1</script>")
    (runs / "a" / "planted.html").write_text(f"<script>document.title='{MARK}'</script>")
    (runs / "a" / "planted.svg").write_text(
        f"<svg xmlns='http://www.w3.org/2000/svg'><script>alert('{MARK}')</script></svg>"
    )
    (runs / "a" / "notes.txt").write_text(MARK)
    manifest = runs / "a" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"status"', f'"{MARK}": 1, "status"', 1))
    (base / "outside").mkdir()
    (base / "outside" / "secret.html").write_text(f"<script>'{MARK}'</script>")
    return runs


@pytest.fixture(scope="module")
def watched() -> Iterator[tuple[int, list[str]]]:
    """A local HTTP server on 127.0.0.1: (port, paths it was asked for)."""
    calls: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            calls.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(f"<script>'{MARK}'</script>".encode())

        do_HEAD = do_POST = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], calls
    server.shutdown()


@pytest.fixture(scope="module")
def explorer(runs: Path) -> Iterator[tuple[object, int]]:
    """(blocks, port) of a launched explorer over `runs`."""
    from t2i_eval.explorer.app import launch

    demo, url = launch(runs, block=False, live_systems=["fake"])
    yield demo, int(url.rstrip("/").rsplit(":", 1)[1])
    demo.close()


def _ask(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    """One raw request (the path is sent exactly as given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _targets(runs: Path, web_port: int) -> list[str]:
    """What a visitor might ask a file or proxy route for."""
    a = runs / "a"
    image = next((a / "images").glob("*.png"))
    files = [
        a / "planted.html",
        a / "planted.svg",
        a / "notes.txt",
        a / "manifest.json",
        a / "report" / "html" / "index.html",
        runs.parent / "outside" / "secret.html",
        image,  # not even run images: they come from the explorer's own route only
    ]
    web = f"http://127.0.0.1:{web_port}"
    return [
        *(str(f) for f in files),
        *("../" * 12 + str(f).lstrip("/") for f in files[:1] + files[5:6]),
        f"{web}/page.html",
        f"{web}/cat.png",
        f"//127.0.0.1:{web_port}/cat.png",
    ]


def _fill(template: str, target: str) -> str:
    """The template's path with every parameter replaced by `target` (URL-quoted as a browser
    would, keeping '/' and ':' so paths and URLs stay paths and URLs)."""
    return PARAM.sub(lambda _: quote(target, safe="/:"), template)


def test_every_route_but_the_pages_own_refuses_files_and_urls(explorer, runs, watched):
    from t2i_eval.explorer.app import PAGE_ROUTES, mounted_routes

    demo, port = explorer
    web_port, calls = watched
    table = mounted_routes(demo.server_app.routes)
    assert {r.template for r in table} >= KNOWN_FILE_ROUTES
    missing = {t for _, t in PAGE_ROUTES} - {r.template for r in table}
    assert not missing, f"PAGE_ROUTES names routes this Gradio lacks: {missing}"
    targets = _targets(runs, web_port)
    checked = 0
    for route in table:
        for method in sorted(route.methods or {"GET"}):
            page = (method, route.template) in PAGE_ROUTES
            if page and not PARAM.search(route.template):
                continue  # the page, the queue, the image route: no path to smuggle a file in
            for target in targets if PARAM.search(route.template) else [""]:
                path = _fill(route.template, target)
                status, _, body = _ask(port, method, path, b"{}" if method == "POST" else None)
                checked += 1
                assert MARK.encode() not in body, (method, path)
                if page:  # Gradio's package assets: its own folder only
                    assert status >= 400, (method, path, status)
                else:
                    assert status == 403, (method, path, status)
    assert checked > len(table)
    assert calls == [], f"the explorer fetched URLs for a visitor: {calls}"


@pytest.mark.parametrize(
    "prefix",
    ["/file=", "/file/", "/gradio_api/file=", "/gradio_api/file/", "/proxy=", "/gradio_api/proxy="],
)
def test_file_and_proxy_paths_of_any_gradio_version_are_refused(explorer, runs, watched, prefix):
    """The routes older and newer Gradio versions serve files or URLs at, whether or not this
    version mounts them: refused all the same (the allow-list does not know them)."""
    _, port = explorer
    web_port, calls = watched
    for target in _targets(runs, web_port):
        for method in ("GET", "HEAD"):
            status, _, body = _ask(port, method, prefix + quote(target, safe="/:"))
            assert status == 403 and MARK.encode() not in body, (method, prefix, target)
    for upload in ("/upload", "/gradio_api/upload"):
        assert _ask(port, "POST", upload, b"x")[0] == 403
    assert calls == []


def _record_with_image(runs: Path, run: str) -> tuple[str, Path]:
    from t2i_eval.store import RunStore

    store = RunStore(runs / run)
    gen = next(g for g in store.read_generations().values() if g.image_path)
    return gen.record_id, store.resolve(gen.image_path)


def test_the_image_route_serves_a_run_image_as_an_image(explorer, runs):
    from t2i_eval.explorer.app import Explorer

    _, port = explorer
    rid, file = _record_with_image(runs, "a")
    status, headers, body = _ask(port, "GET", f"/t2i-eval/run-image?run=a&record={rid}")
    assert status == 200 and body == file.read_bytes()
    assert headers["content-type"] == "image/png"
    assert headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in headers["content-security-policy"]
    # the rows the page shows point at this route, not at a path
    html, _, _ = Explorer(runs).page("a", "b", "all", "all", "any", "A or B", "", 1)
    assert f"src='t2i-eval/run-image?run=a&amp;record={rid}'" in html
    assert "gradio_api/file" not in html


@pytest.mark.parametrize(
    "query",
    [
        "run=nope&record={rid}",  # not a run the explorer found
        "run=a&record=nope",  # not a record of that run
        "run=a&record=../manifest",  # path-like record ids name no record
        "run=a&record=../manifest.json",
        "run=a&record=images/{rid}.png",
        "run=../runs/a&record={rid}",  # path-like run names are not runs
        "run={runs}/a&record={rid}",
        "run=a/report/html&record=index",
        "run=a",
        "",
    ],
)
def test_the_image_route_404s_for_anything_but_a_record(explorer, runs, query):
    _, port = explorer
    rid, _ = _record_with_image(runs, "a")
    path = "/t2i-eval/run-image?" + query.format(rid=rid, runs=quote(str(runs)))
    status, headers, body = _ask(port, "GET", path)
    assert status == 404, (path, status)
    assert headers["x-content-type-options"] == "nosniff" and MARK.encode() not in body


def test_an_image_slot_holding_html_is_not_served(tmp_path):
    """A record's image file that is not an image (an HTML page named `.png`) is not served."""
    from t2i_eval.explorer.app import Explorer

    runs = tmp_path / "runs"
    _fake_run(runs / "r", "fake")
    ex = Explorer(runs)
    rid, file = _record_with_image(runs, "r")
    assert ex.image("r", rid) == (file.read_bytes(), "image/png")
    file.write_text(f"<html><script>'{MARK}'</script></html>")
    assert ex.image("r", rid) is None


def test_explore_dot_serves_with_private_gradio_folders(tmp_path, monkeypatch):
    """`t2i-eval explore .` from the folder that holds the runs: Gradio's upload and cache
    folders are private (0700) and elsewhere, so they are not inside RUNS_DIR."""
    import gradio.utils as gu

    from t2i_eval.explorer.app import launch, private_gradio_folder

    _fake_run(tmp_path / "r", "fake")
    monkeypatch.chdir(tmp_path)
    demo, url = launch(".", block=False, live_systems=["fake"])
    try:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        assert _ask(port, "GET", "/")[0] == 200
        rid, _ = _record_with_image(tmp_path, "r")
        assert _ask(port, "GET", f"/t2i-eval/run-image?run=r&record={rid}")[0] == 200
    finally:
        demo.close()
    private = private_gradio_folder()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    for folder in (Path(gu.get_upload_folder()), gu.get_cache_folder()):
        assert folder.is_absolute() and folder.is_relative_to(private)
        assert not folder.resolve().is_relative_to(tmp_path)
    assert not (tmp_path / ".gradio").exists()


def test_the_gate_judges_the_route_starlette_dispatches_to():
    """Not the URL's look: a path an allowed template matches, but that an earlier route
    catches, is refused; a mounted app the walk cannot look into is refused whole; routes of
    included routers and mounts carry their prefixes."""
    from fastapi import APIRouter, FastAPI
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route
    from starlette.testclient import TestClient

    from t2i_eval.explorer.app import PageOnly

    def says(name: str):
        return lambda request: PlainTextResponse(name)

    api = APIRouter(prefix="/gradio_api")
    api.add_api_route("/queue/data", lambda: PlainTextResponse("queue-data"), methods=["GET"])
    app = FastAPI(
        routes=[
            Route("/gradio_api/{rest:path}", says("catch-all"), methods=["POST"]),
            Route("/gradio_api/queue/join", says("queue-join"), methods=["POST"]),
            Mount("/assets", app=says("opaque")),
            Mount("/static", routes=[Route("/{path:path}", says("static"))]),
        ],
        middleware=[Middleware(PageOnly)],
    )
    app.include_router(api)
    client = TestClient(app)
    assert client.get("/gradio_api/queue/data").text == "queue-data"  # the POST route lets GET by
    assert client.get("/static/x.js").text == "static"  # /static/{path:path}, through the mount
    assert client.post("/gradio_api/queue/join").status_code == 403  # caught by the catch-all
    assert client.get("/assets/x.js").status_code == 403  # an app with no route list
    assert client.get("/elsewhere").status_code == 403  # no route at all
