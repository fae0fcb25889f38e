"""HTTP with retries for every remote call: image APIs and the OpenAI-compatible rewriter.

One place decides what is retried and how, so no caller can count a rate limit as a refusal:
- 408, 429 and 5xx answers, timeouts, connection resets and malformed bodies are transient:
  retried with bounded exponential backoff and jitter, honouring Retry-After;
- any other answer goes to the caller's `parse`, which knows what a refusal looks like;
- a request that carries a credential never follows a redirect (urllib would carry the key
  to the new host) and never goes over plain http to a machine other than this one; one
  without (an image download from a CDN) follows redirects as usual;
- `timeout` is a deadline for a whole attempt (connect, headers, body), not for each read: a
  server that dribbles its answer cannot hold a run (`Deadline`).

urllib only (no new dependency). Credentials are passed per request (`auth`), read from the
environment by the caller at that moment, and never stored, logged or put into a message:
every text taken from an answer or an error goes through a `Redactor`, which removes each run
of MIN_SECRET_RUN characters of a key in any form a server may echo it (raw, JSON-escaped,
URL-quoted, HTML-escaped, base64 of `user:KEY`), before any cut. Specs written to disk go
through `redact_options`: names and `${VAR}` references only.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import email.utils
import html.entities
import http.client
import ipaddress
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlparse

from .errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Answers that say "try again later"; every other status is the caller's to interpret.
RETRY_STATUSES = frozenset({408, 429})
#: A body larger than this is not an image answer: read no further.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Option, header and body names whose values are credentials (the spec goes into manifests).
SENSITIVE_NAME = re.compile(
    r"auth|key|token|secret|cookie|password|signature|credential", re.IGNORECASE
)
#: URL query parameters that carry a credential (Google's `key`, SAS `sig`, OAuth tokens).
SENSITIVE_QUERY = re.compile(
    r"^(key|api_?key|apikey|token|sig|signature|access_?token|auth|password|secret)$|"
    r"(^|[_-])(key|token|secret|password|signature|credential|auth)s?($|[_-])",
    re.IGNORECASE,
)
#: A reference to an environment variable, the one way a spec may name a credential.
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: What a credential template may hold besides `${VAR}`: an auth scheme word, `name=`, spaces.
_TEMPLATE_REST = re.compile(r"^\s*(?:[A-Za-z][A-Za-z0-9_-]*[ =:]\s*)?$")
REDACTED = "<redacted>"


class TransientError(Exception):
    """A failure worth retrying (rate limit, server error, timeout, reset, malformed body).

    Raised by `parse` functions too: a body that is not what the API documents is a broken
    answer, never a refusal. After the last attempt it reaches the caller with `attempts` set.
    """

    def __init__(
        self, message: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.status = status
        self.attempts = 0


class RefusedToSend(UserError):
    """A request that would leak a credential (redirect, plain http to another machine)."""


@dataclass(frozen=True)
class Response:
    """One HTTP answer that is neither transient nor a redirect."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    attempt: int
    """Which attempt produced it (1 = the first request)."""
    redact: Redactor = field(default_factory=lambda: NO_SECRETS, repr=False, compare=False)
    """Removes the request's credentials from text taken from this answer."""

    def json(self) -> Any:
        """The parsed body; an unparseable body is a transient failure (retried)."""
        import json

        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise TransientError(f"malformed JSON body (HTTP {self.status})") from None

    def snippet(self, limit: int = 200) -> str:
        """The start of the body for a message: redacted first, then cut (see `Redactor`)."""
        window = self.body[: 4 * (limit + 16 * self.redact.longest + 16)]  # <= 4 bytes a char
        return self.redact(window.decode("utf-8", "replace"), limit).strip()


# -- redaction -----------------------------------------------------------------------------

#: A run of a secret this long may never reach a record, a log or a message. Shorter runs
#: turn up in ordinary text by chance (`sk-proj`, `Bearer `) and say next to nothing of a key.
MIN_SECRET_RUN = 8
#: Secrets shorter than this are not redacted at all (they would blank ordinary words).
MIN_SECRET_LEN = 6
#: What replaces a secret in a message.
MARK = "[redacted]"
#: Escapes a server may use when it echoes text: JSON (`\/`, `\u002F`), C/JS (`\x2F`), URL
#: quoting (`%2F`, `%2f`) and HTML character references (`&#47;`, `&#x2F;`, `&sol;`).
_ESCAPE = re.compile(
    r"\\u([0-9A-Fa-f]{4})|\\x([0-9A-Fa-f]{2})|\\([^uxA-Za-z0-9])|%([0-9A-Fa-f]{2})"
    r"|&#[xX]([0-9A-Fa-f]{1,6});|&#([0-9]{1,7});|&([A-Za-z][A-Za-z0-9]{1,30});"
)
#: Escapes inside escapes (a URL-quoted key in a JSON string in an HTML page): levels decoded.
_DECODE_LEVELS = 3
#: A credential header's value around the key: `Bearer KEY`, `Key KEY`, `token=KEY`.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*(?: +|=|: *)")
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]{8,}={0,2}$")


def _unescape(match: re.Match[str]) -> str | None:
    """The character one escape stands for; None where it is no escape after all."""
    hex4, hex2, char, pct, hexref, decref, name = match.groups()
    if char is not None:
        return char
    if name is not None:
        return html.entities.html5.get(name + ";")
    code = int(hex4 or hex2 or pct or hexref or "0", 16) if decref is None else int(decref)
    return chr(code) if code < 0x110000 else None


def _decoded(text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    """One level of unescaping; `spans[i]` is where character i came from in the original."""
    out: list[str] = []
    where: list[tuple[int, int]] = []
    last = 0
    for m in _ESCAPE.finditer(text):
        char = _unescape(m)
        if char is None or len(char) != 1:
            continue
        out.append(text[last : m.start()])
        where.extend(spans[last : m.start()])
        out.append(char)
        where.append((spans[m.start()][0], spans[m.end() - 1][1]))
        last = m.end()
    if not where and not out:
        return text, spans
    out.append(text[last:])
    where.extend(spans[last:])
    return "".join(out), where


def _base64_cores(value: str) -> set[str]:
    """What base64 of `value` looks like inside a longer base64 text (`user:KEY`, `KEY:`):
    for each of the three alignments, the characters that depend on `value` alone."""
    raw = value.encode()
    cores = set()
    for offset in range(3):
        a = base64.b64encode(b"\0" * offset + raw + b"\0\0\0").decode()
        b = base64.b64encode(b"\xff" * offset + raw + b"\xff\xff\xff").decode()
        same = [x == y for x, y in zip(a, b, strict=True)]
        start = same.index(True) if True in same else len(same)
        end = start
        while end < len(same) and same[end]:
            end += 1
        core = a[start:end]
        cores.update({core, core.replace("+", "-").replace("/", "_")})  # and URL-safe
    return cores


def _forms(secret: str) -> set[str]:
    """A secret and what stands for it: the key inside `Bearer KEY`, base64 of it (alone or in
    `user:KEY`), and for a key that is itself base64 (`Basic dXNlcjpLRVk=`) the decoded text."""
    bare = _SCHEME.sub("", secret, count=1)
    # `Bearer KEY` itself would add runs like `r KEY…`, which eat ordinary text ("near KEY");
    # a value without a space is kept whole (a key may hold `=` or `:` itself)
    parts = {bare} if any(c.isspace() for c in secret) else {secret, bare}
    for part in list(parts):
        if _BASE64.match(part):
            try:
                text = base64.b64decode(part + "==", altchars=b"-_" if "_" in part else None)
                decoded = text.decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                continue
            if decoded.isprintable():
                parts.update({decoded, *decoded.split(":", 1)})
    forms = set()
    for part in parts:
        if len(part) >= MIN_SECRET_LEN:
            forms.update({part, *_base64_cores(part)})
    return {f for f in forms if len(f) >= MIN_SECRET_LEN}


class Redactor:
    """Removes every run of MIN_SECRET_RUN or more characters of a secret from text, in every
    form a server may echo it: raw, escaped (JSON, URL, HTML, even nested) or in base64.

    Runs rather than whole values: a body cut short, a key split over two lines or a server
    that quotes only part of it must not leave the rest. The original text is scanned through
    up to `_DECODE_LEVELS` unescaped views and every match is cut from the original, so an
    escape sequence is removed whole. Holds the secrets only for as long as it lives; its
    repr shows none of them.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self._grams: dict[int, set[str]] = {}
        self.longest = 0
        for secret in secrets:
            for form in _forms(str(secret)) if secret else ():
                n = min(MIN_SECRET_RUN, len(form))
                grams = self._grams.setdefault(n, set())
                grams.update(form[i : i + n] for i in range(len(form) - n + 1))
                self.longest = max(self.longest, len(form))

    def __bool__(self) -> bool:
        return bool(self._grams)

    def __repr__(self) -> str:
        return f"Redactor({sum(map(len, self._grams.values()))} runs)"

    def __call__(self, text: str, limit: int | None = None) -> str:
        """`text` without the secrets, cut to `limit` characters if given.

        Redacts before it cuts, looking past the cut (far enough for the longest secret fully
        escaped), so a secret straddling the cut leaves no prefix behind."""
        if limit is not None:
            text = text[: limit + 16 * self.longest + 16]
        if not self._grams:
            return text if limit is None else text[:limit]
        hits = self._hits(text)
        end = len(text) if limit is None else min(limit, len(text))
        out, pos = [], 0
        for start, stop in hits:
            if start >= end:
                break
            out.append(text[pos:start])
            out.append(MARK)
            pos = stop
        if pos < end:
            out.append(text[pos:end])
        return "".join(out)

    def _hits(self, text: str) -> list[tuple[int, int]]:
        """Merged (start, stop) ranges of the original text that hold a secret's run."""
        view, spans = text, [(i, i + 1) for i in range(len(text))]
        found: list[tuple[int, int]] = []
        for level in range(_DECODE_LEVELS + 1):
            if level:
                before = view
                view, spans = _decoded(view, spans)
                if view is before:
                    break
            for n, grams in self._grams.items():
                for i in range(len(view) - n + 1):
                    if view[i : i + n] in grams:
                        found.append((spans[i][0], spans[i + n - 1][1]))
        found.sort()
        merged: list[tuple[int, int]] = []
        for start, stop in found:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        return merged

    def scrub(self, value: Any) -> Any:
        """`value` with every string inside it (dict keys too) redacted."""
        if not self._grams:
            return value
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self.scrub(k): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value

    def exception(self, e: BaseException) -> None:
        """Redact an exception's message in place (`args`, and `message` where it has one)."""
        e.args = tuple(self.scrub(a) if isinstance(a, str) else a for a in e.args)
        if isinstance(getattr(e, "message", None), str):
            e.message = self(e.message)  # type: ignore[attr-defined]


NO_SECRETS = Redactor(())


def environment_redactor(names: Iterable[str] = ()) -> Redactor:
    """A Redactor for text that may hold any key of this process (a crash report's traceback):
    the values of the variables `names` and of every variable whose name looks like a
    credential's (`OPENAI_API_KEY`, `FAL_KEY`, `HF_TOKEN`)."""
    wanted = set(names)
    return Redactor(
        v.strip() for k, v in os.environ.items() if k in wanted or SENSITIVE_NAME.search(k)
    )


def is_loopback(host: str | None) -> bool:
    """Whether `host` is this machine (a key may go over plain http only there)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_reference(value: str) -> bool:
    """A value that names its credential (`${VAR}`, `Bearer ${VAR}`, `token=${VAR}`) rather
    than holding it: the only form of a credential that may be written to a manifest."""
    return bool(ENV_REF.search(value)) and bool(_TEMPLATE_REST.match(ENV_REF.sub("", value)))


def _without_userinfo(url: str) -> str:
    """`https://user:KEY@host/` -> `https://<redacted>@host/`: a password in the URL itself."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if sep and "@" in netloc:
        return f"{scheme}://{REDACTED}@{netloc.rpartition('@')[2]}{slash}{path}"
    return url


def redact_url(url: str) -> str:
    """The URL without its query string or user info, for messages: a query may carry a key
    (`?key=...`), and so may `user:KEY@`."""
    head, sep, _ = url.partition("?")
    head = _without_userinfo(head.partition("#")[0])
    return f"{head}?{REDACTED}" if sep else head


def redact_query(url: str) -> str:
    """The URL fit for a spec written to disk: user info, the fragment and query values that
    may be a credential replaced by REDACTED (`${VAR}` references kept, and names, and path).

    A query value may be a credential under any name (`code`, `hapikey`: no list of names is
    complete), so every literal value of MIN_SECRET_RUN characters or more goes, as does any
    under a credential-like name; a shorter one (`v=1`, `size=small`) cannot hold a run of a
    key that long, and is kept so the manifest still says what was asked for."""
    url = _without_userinfo(url)
    head, sep, rest = url.partition("?")
    query, hash_, fragment = rest.partition("#")
    if not sep:
        head, hash_, fragment = url.partition("#")
    if fragment and not _harmless("", fragment):
        fragment = REDACTED
    if sep:
        pairs = parse_qsl(query, keep_blank_values=True)
        # a value unless it is a reference; a bare `?NAME` is itself the literal
        kept = [
            (k, v if _harmless(k, v) else REDACTED)
            if v
            else (k if _harmless("", k) else REDACTED, "")
            for k, v in pairs
        ]
        if not pairs and query:
            query = REDACTED
        elif kept != pairs:
            query = urlencode(kept, safe="${}<>")
    return f"{head}{sep}{query}{hash_}{fragment}"


def _harmless(name: str, value: str) -> bool:
    """A URL part fit for disk: a reference, or too short to be a key and not under a
    credential-like name."""
    short = len(value) < MIN_SECRET_RUN and not SENSITIVE_QUERY.search(name)
    return short or is_reference(value)


def redact_options(value: Any, name: str = "") -> Any:
    """A copy of a component spec (options, headers, body) fit to write to disk: manifests,
    summaries and component info hold names and `${VAR}` references, never a credential.

    - under `headers`: the names, and each value only if it is a `${VAR}` reference (`Bearer
      ${VAR}` too), whatever the header is called (`X-Api: KEY` holds a key as well as
      `Authorization` does); anything else becomes REDACTED;
    - a string under a sensitive name (`api_key`, `client_secret`) likewise, except an
      `*_env` option naming a variable;
    - URLs keep their path and query names, and lose user info and query values that may be
      a key (see `redact_query`).

    Valid specs never hold a literal credential (the API generators refuse one); this is the
    second line, so a spec that is about to be rejected cannot leave its key in a manifest."""
    if name.lower() == "headers":
        if not isinstance(value, dict):
            return REDACTED  # not the mapping it must be; its lines may be "Authorization: KEY"
        return {
            k: v if isinstance(v, str) and is_reference(v) else REDACTED for k, v in value.items()
        }
    if isinstance(value, dict):
        return {k: redact_options(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_options(v, name) for v in value]
    if not isinstance(value, str):
        return value
    if name and SENSITIVE_NAME.search(name):
        names_a_variable = name.endswith("_env") and re.fullmatch(r"[A-Za-z_]\w*", value)
        if not (names_a_variable or is_reference(value)):
            return REDACTED
    if value.lower().startswith(("http://", "https://")):
        return redact_query(value)
    return value


def check_url(url: str, what: str, *, secret: bool) -> None:
    """An http(s) URL with a host; with a credential, https unless the host is this machine.

    Messages show the URL without its query: it may carry a key."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UserError(f"{what} {redact_url(url)!r}: expected http(s)://HOST[:PORT]/PATH")
    if secret and parsed.scheme == "http" and not is_loopback(parsed.hostname):
        raise RefusedToSend(
            f"{what} {redact_url(url)}: refusing to send the API key over plain http to another "
            "machine; use https"
        )


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date (RFC 9110 allows both)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _real_sleep(seconds: float) -> None:
    time.sleep(seconds)  # looked up per call, so a test that patches time.sleep is obeyed


def _real_clock() -> float:
    return time.monotonic()


class RateLimiter:
    """At most `rpm` request starts per minute, spaced evenly (one every 60/rpm seconds).

    Even spacing rather than a burst of `rpm` at the top of each minute: providers also limit
    per second, and a steady pace never trips either. A slot is reserved under the lock and
    waited for outside it, so threads queue in arrival order without holding each other up.
    """

    def __init__(
        self,
        rpm: float | None,
        clock: Callable[[], float] = _real_clock,
        sleep: Callable[[float], None] = _real_sleep,
    ) -> None:
        self.interval = 60.0 / rpm if rpm else 0.0
        self.clock, self.sleep = clock, sleep
        self._next: float | None = None
        self._paused_until = float("-inf")
        self._lock = threading.Lock()

    def pause(self, seconds: float) -> None:
        """No request starts for `seconds` from now (a server's "slow down" is for the key,
        not for the one request that heard it); a longer pause already set stays."""
        with self._lock:
            self._paused_until = max(self._paused_until, self.clock() + seconds)

    def reserve(self) -> float:
        """Claim the next start slot; returns how long to wait for it."""
        with self._lock:
            now = self.clock()
            start = max(now, self._paused_until)
            if self.interval:
                start = start if self._next is None else max(start, self._next)
                self._next = start + self.interval
            return start - now

    def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            self.sleep(wait)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turn redirects into errors: the credential header must not travel to another host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Deadline:
    """One attempt's time limit, for the whole exchange: connect, headers and body.

    A socket timeout alone bounds each read, so a server sending one byte a second holds an
    attempt for as long as it likes. Every socket opened during the attempt (a redirect opens
    another; TLS wraps one) is registered here, and a timer shuts them down when the time is
    up: the read that is waiting then ends at once and the attempt fails as a timeout.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def left(self) -> float:
        """Seconds left (a small positive floor: a zero socket timeout means non-blocking)."""
        return max(0.001, self.ends - time.monotonic())

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for sock in socks:
            _shut(sock)

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed, or detached by a TLS wrap
        sock.shutdown(socket.SHUT_RDWR)


#: The attempt in progress in this thread (the handlers below are shared by every thread).
_DEADLINE: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "deadline", default=None
)


class _Watched(http.client.HTTPConnection):
    """A connection whose sockets the attempt's `Deadline` can shut down, with only the time
    left as their timeout. urllib drops the connection's own reference to the socket once the
    headers are in, so the sockets themselves are registered, the raw one and the TLS one."""

    def connect(self) -> None:
        deadline = _DEADLINE.get()
        if deadline is None:
            super().connect()
            return
        self.timeout = deadline.left()
        make = self._create_connection  # type: ignore[has-type]
        self._create_connection = lambda *a, **kw: deadline.watch(make(*a, **kw))
        super().connect()
        deadline.watch(self.sock)


class _WatchedTLS(_Watched, http.client.HTTPSConnection):
    """`_Watched` for https (HTTPSConnection.connect wraps the socket in TLS)."""


class _DeadlineHTTP(urllib.request.HTTPHandler):
    def do_open(self, http_class: Any, req: urllib.request.Request, **kw: Any) -> Any:
        return super().do_open(_Watched, req, **kw)


class _DeadlineHTTPS(urllib.request.HTTPSHandler):
    def do_open(self, http_class: Any, req: urllib.request.Request, **kw: Any) -> Any:
        return super().do_open(_WatchedTLS, req, **kw)  # urllib's own TLS arguments, as given


class HttpClient:
    """Requests with bounded retries, a pace limit (`rpm`) and a concurrency limit.

    `sleep`, `clock` and `rng` are attributes so tests can replace them with fakes.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout: float = 60.0,
        max_attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        rpm: float | None = None,
        concurrency: int | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.name = name
        self.timeout, self.max_attempts = float(timeout), int(max_attempts)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.sleep: Callable[[float], None] = sleep or _real_sleep
        self.clock: Callable[[], float] = _real_clock
        self.rng = random.Random()
        self.limiter = RateLimiter(rpm, clock=lambda: self.clock(), sleep=lambda s: self.sleep(s))
        self._slots = threading.BoundedSemaphore(concurrency) if concurrency else None
        self._keyed_opener = urllib.request.build_opener(_NoRedirect, _DeadlineHTTP, _DeadlineHTTPS)
        self._plain_opener = urllib.request.build_opener(_DeadlineHTTP, _DeadlineHTTPS)
        self._lock = threading.Lock()
        self.attempts = 0
        """HTTP attempts made, for reports and tests."""
        self.answered = False
        """The server has answered at least once (any status): it exists and listens."""

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Wait before attempt `attempt + 1`: backoff * 2^(attempt-1) with +-50% jitter, at
        least Retry-After, and never more than `max_backoff` (a run must not stall for hours
        because a server asked it to)."""
        wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        wait *= 0.5 + self.rng.random()
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_backoff)

    def request(
        self,
        method: str,
        url: str,
        parse: Callable[[Response], T],
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        auth: Callable[[], Mapping[str, str]] | None = None,
        paced: bool = True,
        secrets: Iterable[str] = (),
    ) -> T:
        """Send until `parse` accepts an answer or `max_attempts` transient failures.

        `auth()` returns the credential headers; it is called per attempt (the key is read
        from the environment then, never kept). `secrets` are the credential values
        themselves (e.g. a key inside `token=KEY` or in the URL's query): every message
        that may reach a log or a record (errors raised here or by `parse`, and the
        `Response.redact` that `parse` uses on text it keeps) is scrubbed of them and of the
        credential headers, and a request with any is keyed (https unless local, no
        redirects followed). `paced=False` skips the rpm limit (a download from a CDN is not
        an API call). Each attempt has `timeout` seconds in all, however slowly the server
        sends. Raises the last `TransientError` when every attempt failed.
        """
        secrets = [s for s in secrets if s]
        for attempt in range(1, self.max_attempts + 1):
            secret = dict(auth()) if auth else {}
            redact = Redactor([*secret.values(), *secrets])
            try:
                resp = self._once(method, url, body, headers, secret, paced, attempt, redact)
                return parse(resp)
            except TransientError as e:
                redact.exception(e)
                e.attempts = attempt
                # A rate limit (429, or any answer with Retry-After) is for the key, not for
                # this one request: every request of this client waits it out, this retry too
                # (its next start waits in the limiter), and so does the next item after a
                # last attempt, instead of spending their attempts on the same 429s.
                shared = paced and (e.status == 429 or e.retry_after is not None)
                if attempt == self.max_attempts:
                    if shared:
                        self.limiter.pause(self.delay(attempt, e.retry_after))
                    raise
                wait = self.delay(attempt, e.retry_after)
                log.info(
                    "%s: %s; retry %d/%d in %.2f s",
                    self.name,
                    e.message,
                    attempt,
                    self.max_attempts - 1,
                    wait,
                )
                if shared:
                    self.limiter.pause(wait)
                else:
                    self.sleep(wait)
            except Exception as e:  # a refusal to send, or parse's own: never with the key
                redact.exception(e)
                raise
        raise AssertionError("unreachable")

    def _once(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        secret: Mapping[str, str],
        paced: bool,
        attempt: int,
        redact: Redactor,
    ) -> Response:
        keyed = bool(redact)  # a key in a header or in the URL itself
        check_url(url, self.name, secret=keyed)
        req = urllib.request.Request(
            url, data=body, headers={**(headers or {}), **secret}, method=method
        )
        if paced:
            self.limiter.acquire()
        if self._slots is not None:
            self._slots.acquire()
        try:
            with self._lock:
                self.attempts += 1
            opener = self._keyed_opener if keyed else self._plain_opener
            status, resp_headers, data = self._exchange(opener, req)
        finally:
            if self._slots is not None:
                self._slots.release()
        self.answered = True
        if 300 <= status < 400:  # the target is never quoted: it may carry the key back
            raise RefusedToSend(
                f"{self.name}: {redact_url(url)} redirected (HTTP {status}); refusing to follow "
                "it with the API key, give the final URL"
            )
        resp = Response(status, resp_headers, data, url, attempt, redact)
        if status in RETRY_STATUSES or status >= 500:
            text = resp.snippet()
            raise TransientError(
                f"HTTP {status}" + (f": {text}" if text else ""),
                retry_after_seconds(resp_headers.get("Retry-After")),
                status,
            )
        return resp

    def _exchange(
        self, opener: urllib.request.OpenerDirector, req: urllib.request.Request
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One request and its whole answer within `timeout` seconds (see `Deadline`)."""
        deadline = Deadline(self.timeout)
        token = _DEADLINE.set(deadline)
        try:
            with deadline:
                status, headers, data = self._send(opener, req, deadline)
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, refused, torn
            if deadline.expired:
                raise TransientError(self._timed_out()) from None
            reason = getattr(e, "reason", None) or e
            raise TransientError(f"{type(e).__name__}: {reason}") from None
        finally:
            _DEADLINE.reset(token)
        if deadline.expired:  # a body read to the connection's end may have been cut short
            raise TransientError(self._timed_out())
        return status, headers, data

    def _timed_out(self) -> str:
        return f"timed out: no complete answer within {self.timeout:g} s"

    def _send(
        self, opener: urllib.request.OpenerDirector, req: urllib.request.Request, deadline: Deadline
    ) -> tuple[int, Mapping[str, str], bytes]:
        try:
            with opener.open(req, timeout=deadline.left()) as resp:
                return resp.status, resp.headers, _read(resp)
        except urllib.error.HTTPError as e:
            try:
                data = _read(e)
            except (OSError, http.client.HTTPException):
                if deadline.expired:
                    raise
                data = b""
            return e.code, e.headers or {}, data
        except ValueError:
            # http.client's "Invalid header value b'Bearer KEY\\r'": the message holds the key
            raise UserError(
                f"{self.name}: a request header holds a line break or control character (a "
                "key copied with its line ending?); the request was not sent"
            ) from None


def _read(resp: Any) -> bytes:
    data = resp.read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise TransientError(f"response body over {MAX_BODY_BYTES} bytes")
    return data
