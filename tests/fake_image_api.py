"""A local stand-in for the image APIs (127.0.0.1 only) that plays scripted answers.

Routes, shaped like the real APIs (see t2i_eval/systems/api/ for the sources):
    POST /v1/images/generations          OpenAI Images
    POST /v1beta/models/MODEL:predict    Imagen through the Gemini API
    POST /fal-ai/flux-pro/v1.1           fal FLUX1.1 [pro] (synchronous endpoint)
    POST /generic                        a made-up JSON API for the `http` adapter
    POST /v1/chat/completions            an OpenAI-compatible chat API (the `llm` rewriter, the
                                         `llm-guard` guard, the `vlm` judge's voters)
    POST /v1/moderations                 OpenAI moderation (texts in a batch, or one image)
    GET  /files/NAME.png                 image downloads (answers that carry a URL)

The prompt carries its script: a prompt ending in `[r429,ok]` gets a 429 on its first request
and `ok` on every later one (the last kind repeats). Every request is recorded in `seen`.
Moderation inputs script their scores too, `{violence=0.8, flagged=true}` anywhere in the text
(see `moderation_scores`); a batch plays the first input's kind that is not `ok`, and an image
plays the script given to it with `FakeImageAPI.script_image`.
Chat answers are scripted with `FakeImageAPI.script_chat(marker, answer, top=..., kinds=...)`:
a request whose last user message holds `marker` (its text parts, and `image:<image_digest>`
for each image part) gets `answer`, with top logprobs on its verdict token when the request
asks for logprobs and `top` is given, and plays `kinds` as a prompt's `[...]` script would
(`r500`, `timeout`, `r400`, ...). A chat request no script matches gets the `llm` rewriter's
answer: a rewrite that echoes the key.
Routing ignores the query string (the `http` adapter may send its key as `?key=...`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import math
import re
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

import numpy as np
from PIL import Image

OPENAI_REFUSAL = (
    "Your request was rejected as a result of our safety system. Your prompt may contain text "
    "that is not allowed by our safety system."
)
OPENAI_MODERATION = "Your request was rejected by the safety system. safety_violations=[violence]."
IMAGEN_RAI = (
    "Unable to show generated images. All images were filtered out because they violated "
    "Vertex AI's usage guidelines. Support codes: 56562880"
)
IMAGEN_BLOCKED = (
    "Image generation failed with the following error: The prompt could not be submitted. "
    "This prompt contains sensitive words that violate Google's Responsible AI practices."
)
FAL_REFUSAL = (
    "The content could not be processed because it contained material flagged by a content checker."
)
GENERIC_REFUSAL = "Request blocked by our content policy"
GENERIC_451 = "Unavailable for legal reasons"
#: Plausible configuration errors that share words with a refusal (`moderation`, `safety
#: setting`, `blocked`): each must be an error, never a refusal (it would read as 100% refusals).
CONFIG_ERRORS = {
    "openai": (
        "Invalid value for 'moderation': the moderation parameter is not supported for this model.",
        "Your organization must be verified to use the model `gpt-image-1` (moderation and "
        "safety settings are unavailable until then).",
    ),
    "imagen": (
        "The safety setting block_none is not allowed for this key; only block_low_and_above "
        "is supported for safetySetting.",
        "personGeneration allow_all is blocked for this project: it is not on the allowlist.",
    ),
    "fal": ("Input should be 'square_hd' or 'square'", "safety_tolerance: invalid value"),
    "http": ("blocked: invalid value for 'size'", "key not allowed on this plan (safety tier)"),
}

#: Answers that echo the request's credential back, each in another form, with the status it
#: comes with (a 5xx is retried, so its text reaches the `-v` log too). The chat route answers
#: 503 in place of a 4xx: a 4xx aborts a whole rewrite, while the point is a record per prompt.
LEAKS = {
    "leakjson": 500,  # raw, inside a JSON body, straddling the 200-character cut
    "leakhtml": 502,  # inside an HTML page, HTML-escaped and as character references
    "leakescaped": 400,  # JSON-escaped: `\/`, `\u002b`
    "leakquoted": 401,  # URL-quoted, upper- and lower-case hex, quote and quote_plus
    "leakbasic": 403,  # base64 of `user:KEY`, `:KEY`, `KEY:` and of KEY alone
    "leakheaders": 400,  # a dump of the request's headers (httpbin's /headers)
    "leakredirect": 307,  # a redirect whose target carries the key
    "leakslow": 500,  # the key dribbled out slower than any timeout allows
}
#: Characters before the key in a `leakjson` body: it starts just before byte 200.
LEAK_AT = 190
#: Seconds between the bytes of a `dribble` answer (and of `leakslow`).
DRIBBLE_EVERY = 0.4

#: Kinds the client must retry (transient) and what every other kind must become.
TRANSIENT = {
    "r429",
    "r500",
    "r503",
    "echo500",
    "timeout",
    "malformed",
    "shape",
    "reset",
    "badimage",
    "b64type",
}
OUTCOMES = {
    "ok": "ok",
    "url": "ok",
    "moved": "ok",
    "hold": "ok",
    "refuse": "refused",
    "refuse2": "refused",
    "placeholder": "refused",
    "flat": "refused",
    "missing": "refused",
    "r401": "error",
    "r400": "error",
    "redirect": "error",
    "echo": "error",
    "cfg400": "error",
    "cfg400b": "error",
}


def expected(provider: str, script: list[str], max_attempts: int) -> tuple[str, int]:
    """(ok|refused|error, requests the client should make) for a script.

    The generic adapter cannot tell a wrong-shaped body or a missing image from a refusal, so
    both are errors there (not retried), unless its spec says otherwise.
    """
    transient = TRANSIENT - {"shape"} if provider == "http" else TRANSIENT
    for attempt in range(max_attempts):
        kind = script[min(attempt, len(script) - 1)]
        if kind in transient:
            continue
        if provider == "http" and kind in ("missing", "shape"):
            return "error", attempt + 1
        return OUTCOMES[kind], attempt + 1
    return "error", max_attempts


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def picture(seed_text: str) -> bytes:
    """A noisy 32x32 picture: no placeholder check may flag it."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:4], "little")
    return png(np.random.default_rng(seed).integers(0, 256, (32, 32, 3)))


BLACK = png(np.zeros((32, 32, 3)))
FLAT = png(np.full((32, 32, 3), 128))


@dataclass(frozen=True)
class ChatScript:
    """What the chat route answers to a request whose last user message holds `marker`."""

    marker: str
    answer: str
    top: dict[str, float] | None = None
    """Probabilities of the verdict token's alternatives (sent as top_logprobs); None: the
    answer carries no logprobs even when asked."""
    kinds: tuple[str, ...] = ("ok",)
    """The transport script, one kind per request (the last repeats), as `[r500,ok]`."""
    model: str | None = None
    """Answer only requests for this model (a voter); None: any model."""
    usage: dict[str, int] | None = None
    """Token counts to report; None: counted from the request and the answer."""


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    provider: str
    prompt: str | None
    kind: str


@dataclass
class FakeImageAPI:
    """The server: `with FakeImageAPI() as api: ... api.url ...`."""

    retry_after: str = "0"
    """Retry-After header sent with every 429."""
    hold: float = 10.0
    """How long a `timeout` answer keeps the client waiting (the client gives up first)."""
    hold_target: int = 0
    hold_timeout: float = 0.3
    """`hold` answers wait until `hold_target` requests are in flight or `hold_timeout` passes."""
    seen: list[Seen] = field(default_factory=list)
    attempts: Counter = field(default_factory=Counter)
    image_scripts: dict[str, str] = field(default_factory=dict)
    """Moderation: an image's pixel digest (`image_digest`) -> the script text it plays."""
    max_inflight: int = 0
    chat_scripts: list[ChatScript] = field(default_factory=list)
    """Chat answers, first match wins (`script_chat`)."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._inflight = 0
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeImageAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def script_image(self, image: Image.Image, script: str) -> None:
        """The moderation route answers `image` as it would the text `script`."""
        self.image_scripts[image_digest(image)] = script

    def script_chat(
        self,
        marker: str,
        answer: str,
        *,
        top: dict[str, float] | None = None,
        kinds: tuple[str, ...] | list[str] = ("ok",),
        model: str | None = None,
        usage: dict[str, int] | None = None,
    ) -> None:
        """The chat route answers requests holding `marker` with `answer` (see ChatScript)."""
        self.chat_scripts.append(ChatScript(marker, answer, top, tuple(kinds), model, usage))

    def _chat_script(self, text: str, model: Any) -> ChatScript | None:
        for script in self.chat_scripts:
            if script.marker in text and script.model in (None, model):
                return script
        return None

    def requests_for(self, prompt: str) -> list[Seen]:
        return [s for s in self.seen if s.prompt == prompt]

    def _next_kind(self, prompt: str) -> str:
        m = re.search(r"\[([a-z0-9_,]+)\]\s*$", prompt)
        script = m.group(1).split(",") if m else ["ok"]
        with self._lock:
            n = self.attempts[prompt]
            self.attempts[prompt] += 1
        return script[min(n, len(script) - 1)]

    def _hold(self) -> None:
        with self._cond:
            self._inflight += 1
            self.max_inflight = max(self.max_inflight, self._inflight)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._inflight >= self.hold_target, self.hold_timeout)
            self._inflight -= 1


class _Handler(BaseHTTPRequestHandler):
    api: FakeImageAPI
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the connection was reset on purpose
            super().finish()

    # -- plumbing --------------------------------------------------------------------------

    def _send(self, status: int, payload: Any = None, raw: bytes | None = None, **headers: str):
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(data)

    def _record(self, provider: str, body: bytes, prompt: str | None, kind: str) -> None:
        with self.api._lock:
            self.api.seen.append(
                Seen(self.command, self.path, dict(self.headers), body, provider, prompt, kind)
            )

    def do_GET(self) -> None:
        moved = re.fullmatch(r"/moved/(\w+\.png)", self.path)
        if moved:  # a CDN that redirects: fine to follow, no key travels with a download
            self._record("download", b"", None, "moved")
            self.send_response(302)
            self.send_header("Location", f"/files/{moved.group(1)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        m = re.fullmatch(r"/files/(black|[0-9a-f]+)\.png", self.path)
        self._record("download", b"", None, "download")
        if not m:
            self._send(404, {"detail": "not found"})
            return
        data = BLACK if m.group(1) == "black" else picture(m.group(1))
        self._send(200, raw=data, Content_Type="image/png")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = json.loads(body)
        route = self.path.split("?", 1)[0]
        if route == "/v1/images/generations":
            provider, prompt = "openai", request["prompt"]
        elif re.fullmatch(r"/v1beta/models/[\w.\-]+:predict", route):
            provider, prompt = "imagen", request["instances"][0]["prompt"]
        elif route == "/fal-ai/flux-pro/v1.1":
            provider, prompt = "fal", request["prompt"]
        elif route == "/generic":
            provider, prompt = "http", request["input"]["text"]
        elif route == "/v1/chat/completions":
            script = self.api._chat_script(chat_text(request), request.get("model"))
            if script is not None:
                self._chat_post(body, request, script)
                return
            provider, prompt = "chat", request["messages"][-1]["content"]
        elif route == "/v1/moderations":
            self._moderations_post(body, request)
            return
        else:
            self._record("unknown", body, None, "404")
            self._send(404, {"detail": f"no route {self.path}"})
            return
        kind = self.api._next_kind(prompt)
        self._record(provider, body, prompt, kind)
        self._answer(provider, kind, prompt, request)

    def _moderations_post(self, body: bytes, request: dict) -> None:
        """Each input advances its own script; the request plays the first kind that is not
        `ok` (a 429 or 500 is for the whole request, as on the real endpoint)."""
        texts = [self._moderation_text(x) for x in request["input"]]
        kinds = [self.api._next_kind(t) for t in texts]
        kind = next((k for k in kinds if k != "ok"), "ok")
        self._record("moderation", body, "\n".join(texts), kind)
        if kind == "r400":
            err = {"message": "Invalid input", "type": "invalid_request_error", "code": None}
            self._send(400, {"error": err})
            return
        self._answer("moderation", kind, texts, request)

    def _chat_post(self, body: bytes, request: dict, script: ChatScript) -> None:
        """A scripted chat answer: the marker's (and model's) own transport script first."""
        key = f"{script.model or '*'}|{script.marker} [{','.join(script.kinds)}]"
        kind = self.api._next_kind(key)
        self._record("chat", body, script.marker, kind)
        if kind == "r400":
            err = {"message": f"The model {request.get('model')} does not exist", "code": None}
            self._send(400, {"error": err})
            return
        self._script = script
        self._answer("chat", kind, script.marker, request)

    def _moderation_text(self, part: Any) -> str:
        """A text input as it is; an image part as the script given to its pixels."""
        if isinstance(part, str):
            return part
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,"), url[:40]
        image = Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))
        digest = image_digest(image)
        return self.api.image_scripts.get(digest, f"an unscripted image {digest[:12]}")

    # -- the answers -----------------------------------------------------------------------

    def _credentials(self) -> list[str]:
        """The keys this request carried, bare (`Bearer KEY` -> KEY), wherever they were."""
        values = [self.headers.get(h) for h in ("Authorization", "x-goog-api-key", "X-Api")]
        values += [v for k, v in parse_qsl(self.path.partition("?")[2]) if k == "key"]
        return [re.sub(r"^(Bearer|Key|token=) *", "", v) for v in values if v]

    def _dribble(self, data: bytes, every: float = DRIBBLE_EVERY) -> None:
        """Write `data` one byte at a time: no single read waits long, the whole does."""
        for i in range(len(data)):
            if self.api._stop.wait(every if i else 0):
                break
            try:
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
            except OSError:  # the client gave up, as it should
                break
        self.close_connection = True

    def _leak(self, provider: str, kind: str) -> None:
        """Echo every credential of the request in the form `kind` names (see LEAKS)."""
        status = LEAKS[kind]
        if provider == "chat" and status < 500:
            status = 503
        keys = self._credentials() or ["(no key)"]
        key = keys[0]
        if kind == "leakjson":
            text = "x" * (LEAK_AT - len('{"error": {"message": "')) + " ".join(keys)
            raw = json.dumps({"error": {"message": text, "code": "server_error"}}).encode()
        elif kind == "leakhtml":
            page = (
                "<html><head><title>502 Bad Gateway</title></head><body>"
                + "<p>upstream said:</p>" * 6  # the key starts near character 180
                + f"<pre>{html.escape(key)}</pre><p>{''.join(f'&#{ord(c)};' for c in key)}</p>"
                + f"<a href='/retry?key={key.replace('/', '&#x2F;')}'>retry</a></body></html>"
            )
            self._send(status, raw=page.encode(), Content_Type="text/html")
            return
        elif kind == "leakescaped":
            escaped = json.dumps(key).strip('"').replace("/", "\\/").replace("+", "\\u002b")
            raw = ('{"fault": "credential \\"' + escaped + '\\" is not valid"}').encode()
        elif kind == "leakquoted":
            lower = re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(key, safe=""))
            raw = json.dumps(
                {"fault": f"bad key={quote(key, safe='')} ({lower}, {quote_plus(key)})"}
            ).encode()
        elif kind == "leakbasic":
            forms = [f"user:{key}", f":{key}", f"{key}:", key]
            b64 = [base64.b64encode(f.encode()).decode() for f in forms]
            raw = json.dumps({"fault": "tried Basic " + ", ".join(b64)}).encode()
        elif kind == "leakheaders":
            # those carrying a key first, so they fall in the part of the body a record keeps
            dump = sorted(self.headers.items(), key=lambda kv: not any(k in kv[1] for k in keys))
            raw = json.dumps({"headers": dict(dump), "fault": "unauthorized"}).encode()
        elif kind == "leakredirect":
            self.send_response(status)
            self.send_header("Location", f"http://127.0.0.1:9/login?key={quote(key, safe='')}")
            body = json.dumps({"fault": f"moved to /login?key={key}"}).encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        else:  # leakslow
            data = json.dumps({"error": {"message": f"slowly: {key} {key}"}}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.flush()
            self._dribble(data, every=DRIBBLE_EVERY / 8)
            return
        self._send(status, raw=raw)

    def _answer(self, provider: str, kind: str, prompt: str, request: dict) -> None:
        if kind in LEAKS:
            self._leak(provider, kind)
            return
        if kind == "dribble":  # the whole answer, status line first, a byte at a time
            data = json.dumps({"error": {"message": "slow"}}).encode()
            head = f"HTTP/1.1 500 Slow\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            self._dribble(head + data)
            return
        if kind == "dribblebody":  # headers at once, then the body a byte at a time
            data = json.dumps({"error": {"message": "slow " * 20}}).encode()
            self.send_response(500)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.flush()
            self._dribble(data)
            return
        if kind == "timeout":
            self.api._stop.wait(self.api.hold)  # the client's timeout is far shorter
            self.close_connection = True
            return
        if kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # RST: the client sees a connection reset
            self.close_connection = True
            return
        if kind == "r429":
            self._send(
                429, {"error": {"message": "Rate limit reached"}}, Retry_After=self.api.retry_after
            )
            return
        if kind in ("r500", "r503"):
            self._send(int(kind[1:]), {"error": {"message": "The server had an error"}})
            return
        if kind == "malformed":
            self._send(200, raw=b'{"data": [{"b64_json": "iVBOR')
            return
        if kind == "shape":
            self._send(200, ["unexpected"])
            return
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "r401":
            self._send(
                401,
                {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}},
            )
            return
        if kind in ("echo", "echo500", "echobare500"):  # a server that echoes the credential
            cred = (
                self.headers.get("Authorization")
                or self.headers.get("x-goog-api-key")
                or self.path.partition("?")[2]
            )
            if kind == "echobare500":  # the key alone, without "Bearer " or "token="
                cred = re.split(r"[ =]", cred)[-1]
            text = f"rejected credential {cred}"
            payload = {"error": {"message": text}, "detail": [{"msg": text, "type": "auth"}]}
            self._send(400 if kind == "echo" else 500, payload)
            return
        if kind in ("cfg400", "cfg400b"):
            self._config_error(provider, CONFIG_ERRORS[provider][kind == "cfg400b"])
            return
        if kind == "b64type":  # a success body whose image field is not text
            self._send(200, _B64TYPE[provider])
            return
        if kind == "hold":
            self.api._hold()
            kind = "ok"
        getattr(self, f"_{provider}")(kind, prompt, request)

    def _config_error(self, provider: str, message: str) -> None:
        if provider == "fal":
            detail = {"loc": ["body", "image_size"], "msg": message, "type": "value_error"}
            self._send(422, {"detail": [detail]})
        elif provider == "imagen":
            self._send(
                400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
            )
        else:  # no error code: only the documented wording may make it a refusal
            err = {"code": None, "message": message, "type": "invalid_request_error"}
            self._send(400, {"error": err})

    def _image_b64(self, kind: str, prompt: str) -> str:
        data = {"placeholder": BLACK, "flat": FLAT, "badimage": b"not an image at all"}.get(
            kind, picture(prompt)
        )
        return base64.b64encode(data).decode()

    def _file_url(self, prompt: str, folder: str = "files") -> str:
        name = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        return f"http://127.0.0.1:{self.server.server_address[1]}/{folder}/{name}.png"

    def _openai(self, kind: str, prompt: str, request: dict) -> None:
        if kind == "refuse":
            code = (
                "moderation_blocked"
                if request["model"].startswith("gpt-image")
                else ("content_policy_violation")
            )
            message = OPENAI_MODERATION if code == "moderation_blocked" else OPENAI_REFUSAL
            err = {"code": code, "message": message, "param": None, "type": "invalid_request_error"}
            self._send(400, {"error": err})
        elif kind == "refuse2":  # older answers: no code, only the wording
            self._send(
                400,
                {
                    "error": {
                        "code": None,
                        "message": OPENAI_REFUSAL,
                        "type": "invalid_request_error",
                    }
                },
            )
        elif kind == "r400":
            self._send(
                400,
                {"error": {"code": "invalid_value", "message": "Invalid size", "param": "size"}},
            )
        elif kind == "missing":
            self._send(200, {"created": 1, "data": []})
        else:
            item: dict[str, Any] = (
                {"url": self._file_url(prompt, "moved" if kind == "moved" else "files")}
                if kind in ("url", "moved")
                else {"b64_json": self._image_b64(kind, prompt)}
            )
            if request["model"] == "dall-e-3":
                item["revised_prompt"] = f"A detailed illustration of {prompt}"
            self._send(200, {"created": 1, "data": [item]})

    def _imagen(self, kind: str, prompt: str, request: dict) -> None:
        if kind == "refuse":
            self._send(200, {"predictions": [{"raiFilteredReason": IMAGEN_RAI}]})
        elif kind == "refuse2":
            self._send(
                400,
                {"error": {"code": 400, "message": IMAGEN_BLOCKED, "status": "INVALID_ARGUMENT"}},
            )
        elif kind == "r400":
            self._send(
                400,
                {
                    "error": {
                        "code": 400,
                        "message": "Invalid aspect ratio",
                        "status": "INVALID_ARGUMENT",
                    }
                },
            )
        elif kind == "missing":
            self._send(200, {})
        else:
            pred = {"bytesBase64Encoded": self._image_b64(kind, prompt), "mimeType": "image/png"}
            self._send(200, {"predictions": [pred]})

    def _fal(self, kind: str, prompt: str, request: dict) -> None:
        if kind == "refuse":
            detail = {
                "loc": ["body", "prompt"],
                "msg": FAL_REFUSAL,
                "type": "content_policy_violation",
            }
            self._send(422, {"detail": [detail]})
            return
        if kind == "r400":
            detail = {
                "loc": ["body", "seed"],
                "msg": "Input should be less than 2**32",
                "type": "less_than",
            }
            self._send(422, {"detail": [detail]})
            return
        if kind == "missing":
            self._send(200, {"images": [], "has_nsfw_concepts": [], "seed": request.get("seed")})
            return
        flagged = kind == "refuse2"  # the safety checker hides the image behind a black one
        if flagged or kind == "url" or not request.get("sync_mode"):
            url = (
                f"http://127.0.0.1:{self.server.server_address[1]}/files/black.png"
                if flagged
                else self._file_url(prompt)
            )
        else:
            url = "data:image/png;base64," + self._image_b64(kind, prompt)
        image = {"url": url, "width": 32, "height": 32, "content_type": "image/png"}
        self._send(
            200,
            {
                "images": [image],
                "timings": {"inference": 0.01},
                "seed": request.get("seed"),
                "has_nsfw_concepts": [flagged],
                "prompt": prompt,
            },
        )

    def _http(self, kind: str, prompt: str, request: dict) -> None:
        if kind == "refuse":
            self._send(200, {"error": {"message": GENERIC_REFUSAL}})
        elif kind == "refuse2":
            self._send(451, {"error": {"message": GENERIC_451}})
        elif kind == "r400":
            self._send(400, {"error": {"message": "bad size"}})
        elif kind == "missing":
            self._send(200, {"output": {}})
        elif kind == "url":
            self._send(200, {"output": {"image": self._file_url(prompt)}})
        else:
            self._send(
                200,
                {
                    "output": {
                        "image": self._image_b64(kind, prompt),
                        "seed": request["input"]["seed"],
                    }
                },
            )

    def _moderation(self, kind: str, texts: list[str], request: dict) -> None:
        """One result per input with its scripted scores (`moderation_scores`)."""
        results = []
        for text in texts:
            scores, flagged = moderation_scores(text)
            results.append(
                {
                    "flagged": flagged,
                    "categories": {c: s >= 0.5 for c, s in scores.items()},
                    "category_scores": scores,
                    "category_applied_input_types": {c: ["text"] for c in scores},
                }
            )
        self._send(200, {"id": "modr-1", "model": request["model"], "results": results})

    def _chat(self, kind: str, prompt: str, request: dict) -> None:
        script = getattr(self, "_script", None)
        if script is not None:
            self._send(200, chat_completion(script, request))
            return
        self._rewrite(kind, prompt, request)

    def _rewrite(self, kind: str, prompt: str, request: dict) -> None:
        """A rewrite that echoes the key in its text (raw, URL-quoted, base64 of `user:KEY`);
        it ends in `[ok]`, so the rewritten prompt plays `ok` on the image routes."""
        key = (self._credentials() or ["(no key)"])[0]
        b64 = base64.b64encode(f"user:{key}".encode()).decode()
        text = f"a calm harbour scene, token {key} {quote(key, safe='')} {b64} [ok]"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})


#: The categories the moderation route scores: the guard's own list (what the API scores).
from t2i_eval.systems.moderation import CATEGORIES as MODERATION_CATEGORIES  # noqa: E402


def moderation_scores(text: str) -> tuple[dict[str, float], bool]:
    """(category scores, flagged) scripted by `{cat=score, ..., flagged=true|false}` in `text`.

    An unscripted category scores a small number derived from the text and category, strictly
    between 0 and 0.01 (so a threshold of 0 refuses everything, the default nothing); an
    unscripted `flagged` is whether any score reaches 0.5."""
    scripted: dict[str, str] = {}
    for block in re.findall(r"\{([^{}]*)\}", text):
        for pair in block.split(","):
            key, _, value = pair.partition("=")
            scripted[key.strip()] = value.strip()
    scores = {}
    for c in MODERATION_CATEGORIES:
        if c in scripted:
            scores[c] = float(scripted[c])
        else:
            h = int.from_bytes(hashlib.sha256(f"{text}|{c}".encode()).digest()[:4], "little")
            scores[c] = 0.0001 + (h % 9000) / 1_000_000
    if "flagged" in scripted:
        return scores, scripted["flagged"] == "true"
    return scores, any(s >= 0.5 for s in scores.values())


def chat_text(request: dict) -> str:
    """The last user message as text: its text parts, and `image:<image_digest>` per image."""
    users = [m for m in request.get("messages", []) if m.get("role") == "user"]
    content = users[-1].get("content") if users else ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if part.get("type") == "text":
            parts.append(part["text"])
        elif part.get("type") == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,"), url[:40]
            image = Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))
            parts.append(f"image:{image_digest(image)}")
    return "\n".join(parts)


def answer_tokens(answer: str) -> list[str]:
    """The answer cut the way BPE vocabularies cut such text: newline runs, words and numbers
    with their leading space, single punctuation marks ("\n\nunsafe\nS1" -> "\n\n",
    "unsafe", "\n", "S", "1")."""
    return re.findall(r"\n+| ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]|\s", answer)


def chat_completion(script: ChatScript, request: dict) -> dict[str, Any]:
    """The completion body: the scripted answer, logprobs when asked for and scripted (the
    scripted alternatives on the first token that is one of them, else on the first
    non-whitespace token; every other token certain), token counts."""
    tokens = answer_tokens(script.answer)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": script.answer},
        "finish_reason": "stop",
        "logprobs": None,
    }
    if request.get("logprobs") and script.top is not None and tokens:
        keys = {k.strip().lower() for k in script.top if k.strip()}
        at = next(
            (i for i, t in enumerate(tokens) if t.strip() and t.strip().lower() in keys), None
        )
        if at is None:
            at = next(i for i, t in enumerate(tokens) if t.strip())
        n = int(request.get("top_logprobs") or 0)
        ranked = sorted(script.top.items(), key=lambda kv: -kv[1])[:n]
        content = []
        for i, t in enumerate(tokens):
            if i == at:
                own = script.top.get(t, dict(ranked).get(t, 1.0))
                alts = [{"token": k, "logprob": math.log(p)} for k, p in ranked]
                content.append({"token": t, "logprob": math.log(own), "top_logprobs": alts})
            else:
                content.append(
                    {"token": t, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": 0.0}]}
                )
        choice["logprobs"] = {"content": content}
    usage = script.usage or {
        "prompt_tokens": len(chat_text(request).split()),
        "completion_tokens": len(tokens),
    }
    usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": request.get("model"),
        "choices": [choice],
        "usage": usage,
    }


def image_digest(image: Image.Image) -> str:
    """An image's identity by its pixels (not its file bytes: the guard encodes it anew)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


_B64TYPE: dict[str, Any] = {
    "openai": {"created": 1, "data": [{"b64_json": 12345}]},
    "imagen": {"predictions": [{"bytesBase64Encoded": ["iVBOR"], "mimeType": "image/png"}]},
    "fal": {"images": [{"url": {"href": "x"}}], "has_nsfw_concepts": [False]},
    "http": {"output": {"image": {"b64": "iVBOR"}}},
}
