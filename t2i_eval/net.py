"""HTTP with retries for every remote call: image APIs and the OpenAI-compatible rewriter.

One place decides what is retried and how, so no caller can count a rate limit as a refusal:
- 408, 429 and 5xx answers, timeouts, connection resets and malformed bodies are transient:
  retried with bounded exponential backoff and jitter, honouring Retry-After;
- any other answer goes to the caller's `parse`, which knows what a refusal looks like;
- a request that carries a credential never follows a redirect (urllib would carry the key
  to the new host) and never goes over plain http to a machine other than this one; one
  without (an image download from a CDN) follows redirects as usual.

urllib only (no new dependency). Credentials are passed per request (`auth`), read from the
environment by the caller at that moment, and never stored, logged or put into a message.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import logging
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlparse

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

    def json(self) -> Any:
        """The parsed body; an unparseable body is a transient failure (retried)."""
        import json

        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise TransientError(f"malformed JSON body (HTTP {self.status})") from None

    def snippet(self, limit: int = 200) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip()


def is_loopback(host: str | None) -> bool:
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


def redact_url(url: str) -> str:
    """The URL without its query string, for messages: a query may carry a key (`?key=...`)."""
    head, sep, _ = url.partition("?")
    return f"{head}?{REDACTED}" if sep else head


def redact_query(url: str) -> str:
    """The URL with every sensitive query value that is not a `${VAR}` reference replaced by
    REDACTED (for specs written to disk, where the rest of the query is worth keeping)."""
    head, sep, rest = url.partition("?")
    if not sep:
        return url
    query, hash_, fragment = rest.partition("#")
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs and query:
        return f"{head}?{REDACTED}"
    kept = [
        (k, v if not SENSITIVE_QUERY.search(k) or is_reference(v) else REDACTED) for k, v in pairs
    ]
    if kept == pairs:
        return url  # nothing secret: keep the URL byte for byte
    return f"{head}?{urlencode(kept, safe='${}<>')}{hash_}{fragment}"


def redact_options(value: Any, name: str = "") -> Any:
    """A copy of a component spec (options, headers, body) fit to write to disk: a string
    under a sensitive name becomes REDACTED unless it is a `${VAR}` reference (or, for an
    `*_env` option, the name of the variable), and URLs lose sensitive query values.

    Valid specs never hold a literal credential (the API generators refuse one); this is the
    second line, so a spec that is about to be rejected cannot leave its key in a manifest."""
    if name.lower() == "headers" and not isinstance(value, dict):
        return REDACTED  # not the mapping it must be; its lines may be "Authorization: KEY"
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
    if "?" in value and value.startswith(("http://", "https://")):
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


def secret_forms(value: str) -> list[str]:
    """A secret as it may come back: itself and URL-quoted (a key sent in a query)."""
    return sorted({value, quote(value, safe="")}, key=len, reverse=True)


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
        self._keyed_opener = urllib.request.build_opener(_NoRedirect)
        self._plain_opener = urllib.request.build_opener()
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
        that may reach a log or a record is scrubbed of them and of the credential headers,
        and a request with any is keyed (https unless local, no redirects followed).
        `paced=False` skips the rpm limit (a download from a CDN is not an API call).
        Raises the last `TransientError` when every attempt failed.
        """
        secrets = [s for s in secrets if s]
        for attempt in range(1, self.max_attempts + 1):
            try:
                resp = self._once(method, url, body, headers, auth, paced, attempt, secrets)
                return parse(resp)
            except TransientError as e:
                e.message = _redact(e.message, secrets)
                e.args = (e.message,)
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
        raise AssertionError("unreachable")

    def _once(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        auth: Callable[[], Mapping[str, str]] | None,
        paced: bool,
        attempt: int,
        secrets: list[str],
    ) -> Response:
        secret = dict(auth()) if auth else {}
        keyed = bool(secret or secrets)  # a key in a header or in the URL itself
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
        if 300 <= status < 400:
            raise RefusedToSend(
                f"{self.name}: {redact_url(url)} redirected (HTTP {status}); refusing to follow "
                "it with the API key, give the final URL"
            )
        if status in RETRY_STATUSES or status >= 500:
            text = _redact(
                data[:200].decode("utf-8", "replace").strip(), [*secret.values(), *secrets]
            )
            raise TransientError(
                f"HTTP {status}" + (f": {text}" if text else ""),
                retry_after_seconds(resp_headers.get("Retry-After")),
                status,
            )
        return Response(status, resp_headers, data, url, attempt)

    def _exchange(
        self, opener: urllib.request.OpenerDirector, req: urllib.request.Request
    ) -> tuple[int, Mapping[str, str], bytes]:
        try:
            with opener.open(req, timeout=self.timeout) as resp:
                return resp.status, resp.headers, _read(resp)
        except urllib.error.HTTPError as e:
            try:
                data = _read(e)
            except (OSError, http.client.HTTPException):
                data = b""
            return e.code, e.headers or {}, data
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, refused, torn
            reason = getattr(e, "reason", None) or e
            raise TransientError(f"{type(e).__name__}: {reason}") from None
        except ValueError:
            # http.client's "Invalid header value b'Bearer KEY\\r'": the message holds the key
            raise UserError(
                f"{self.name}: a request header holds a line break or control character (a "
                "key copied with its line ending?); the request was not sent"
            ) from None


def _redact(text: str, secrets: Iterable[str]) -> str:
    """A server that echoes the request must not put the key into a log or a record."""
    parts = set()
    for value in secrets:
        for part in (value, value.split(" ", 1)[-1]):  # "Bearer KEY" and KEY alone
            parts.update(secret_forms(part))
    for part in sorted(parts, key=len, reverse=True):
        if len(part) >= 6:
            text = text.replace(part, "[redacted]")
    return text


def _read(resp: Any) -> bytes:
    data = resp.read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise TransientError(f"response body over {MAX_BODY_BYTES} bytes")
    return data
