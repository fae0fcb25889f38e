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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

from .errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Answers that say "try again later"; every other status is the caller's to interpret.
RETRY_STATUSES = frozenset({408, 429})
#: A body larger than this is not an image answer: read no further.
MAX_BODY_BYTES = 64 * 1024 * 1024


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


def check_url(url: str, what: str, *, secret: bool) -> None:
    """An http(s) URL with a host; with a credential, https unless the host is this machine."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UserError(f"{what} {url!r}: expected http(s)://HOST[:PORT]/PATH")
    if secret and parsed.scheme == "http" and not is_loopback(parsed.hostname):
        raise RefusedToSend(
            f"{what} {url}: refusing to send the API key over plain http to another machine; "
            "use https"
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
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Claim the next start slot; returns how long to wait for it."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self.clock()
            start = now if self._next is None else max(now, self._next)
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
    ) -> T:
        """Send until `parse` accepts an answer or `max_attempts` transient failures.

        `auth()` returns the credential headers; it is called per attempt (the key is read
        from the environment then, never kept). `paced=False` skips the rpm limit (a
        download from a CDN is not an API call). Raises the last `TransientError` when
        every attempt failed.
        """
        for attempt in range(1, self.max_attempts + 1):
            try:
                resp = self._once(method, url, body, headers, auth, paced, attempt)
                return parse(resp)
            except TransientError as e:
                e.attempts = attempt
                if attempt == self.max_attempts:
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
    ) -> Response:
        secret = dict(auth()) if auth else {}
        check_url(url, self.name, secret=bool(secret))
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
            opener = self._keyed_opener if secret else self._plain_opener
            status, resp_headers, data = self._exchange(opener, req)
        finally:
            if self._slots is not None:
                self._slots.release()
        self.answered = True
        if 300 <= status < 400:
            raise RefusedToSend(
                f"{self.name}: {url} redirected (HTTP {status}); refusing to follow it with the "
                "API key, give the final URL"
            )
        if status in RETRY_STATUSES or status >= 500:
            text = _redact(data[:200].decode("utf-8", "replace").strip(), secret.values())
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


def _redact(text: str, secrets: Any) -> str:
    """A server that echoes the request must not put the key into a log or a record."""
    for value in secrets:
        for part in {value, value.split(" ", 1)[-1]}:  # "Bearer KEY" and KEY alone
            if len(part) >= 6:
                text = text.replace(part, "[redacted]")
    return text


def _read(resp: Any) -> bytes:
    data = resp.read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise TransientError(f"response body over {MAX_BODY_BYTES} bytes")
    return data
