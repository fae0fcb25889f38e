"""What every image API generator shares: transport, option checks, answer parsing helpers,
the placeholder check, and the rule that turns an answer into a decision.

A provider (one file per provider beside this one) supplies only its endpoint, request body
and `_parse`, which maps one HTTP answer to an `Outcome`: refused True (a policy refusal,
carrying the provider's own message), False (an image), or None (could not check).

A refusal becomes a refusal decision carrying the provider's own message; a black or single
flat-colour image is a refusal too (a placeholder, not a picture), its statistics kept in `raw`.
Rate limits, server errors, timeouts, resets and malformed bodies are retried by
`net.HttpClient`; when they persist the item "could not be checked" (status error, retried on
resume), never a refusal. Failures are returned per item rather than raised, so one bad item
does not make the System re-request (and re-pay for) the rest of its batch.

Keys are read from environment variables at request time (stripped: a key copied from a CRLF
`.env` file would otherwise break the header, and http.client's error quotes the header),
sent only in their header (or, for the `http` adapter, where its URL template asks), and
never stored, logged or recorded: `info()` names the variable, never its value, and every
message and raw field is scrubbed of it in case a provider echoes it back.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ...errors import UserError
from ...net import (
    MIN_SECRET_LEN,
    SENSITIVE_NAME,
    HttpClient,
    Redactor,
    Response,
    TransientError,
    check_url,
    redact_options,
)
from ...types import StageDecision
from ..chain import GeneratorResult

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_MODEL_ID = re.compile(r"^[A-Za-z0-9._\-/]+$")

#: Set by `ImageAPI.check_options`: validate option values only (no key needed, no client).
_CHECK_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("check_only", default=False)


def _world_size() -> int:
    """Processes sharing one provider budget (torchrun / accelerate set WORLD_SIZE); 1 alone."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


#: Placeholder rule, on a 32x32 grey copy: "black" when mean luminance <= BLACK_MAX_MEAN and
#: std <= BLACK_MAX_STD (what fal and diffusers-style checkers return); "flat" when std <=
#: FLAT_MAX_STD (one colour: no generated picture is that uniform).
BLACK_MAX_MEAN = 8.0
BLACK_MAX_STD = 4.0
FLAT_MAX_STD = 1.0


@dataclass
class Outcome:
    """What one provider answer means: refused True/False, or None (could not check)."""

    refused: bool | None
    message: str = ""
    image: Any = None
    raw: dict[str, Any] = field(default_factory=dict)


class NoImage(Exception):
    """An answer that is neither an image nor a refusal (e.g. a download that 404s)."""


def placeholder_stats(image: Image.Image) -> dict[str, Any]:
    """Luminance statistics and the placeholder kind ("black", "flat" or None)."""
    g = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    mean, std = float(g.mean()), float(g.std())
    kind = None
    if mean <= BLACK_MAX_MEAN and std <= BLACK_MAX_STD:
        kind = "black"
    elif std <= FLAT_MAX_STD:
        kind = "flat"
    return {"kind": kind, "mean_luminance": round(mean, 3), "luminance_std": round(std, 3)}


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB image; bytes that are no image are a broken answer (retried)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise TransientError(f"undecodable image ({type(e).__name__})") from None
    return img.convert("RGB")


def decode_base64_image(text: Any) -> Image.Image:
    """Base64 text -> image; anything else (a number, a list) is a broken answer (retried)."""
    if not isinstance(text, str):
        raise TransientError(f"image field is {type(text).__name__}, not base64 text")
    try:
        return decode_image(base64.b64decode(text))
    except (binascii.Error, ValueError):
        raise TransientError("image field is not valid base64") from None


def dig(obj: Any, path: str) -> Any:
    """The value at a dotted path (`data.0.b64_json`; integers index lists), or None."""
    for part in path.split("."):
        if isinstance(obj, list) and re.fullmatch(r"-?\d+", part):
            i = int(part)
            obj = obj[i] if -len(obj) <= i < len(obj) else None
        elif isinstance(obj, dict):
            obj = obj.get(part)
        else:
            return None
        if obj is None:
            return None
    return obj


def read_key(var: str, who: str) -> str:
    """The key in environment variable `var`, stripped of surrounding whitespace.

    Whitespace or a control character left inside cannot be part of a key and would make
    http.client raise an error quoting the whole header, key included; the message here names
    only the variable."""
    value = os.environ.get(var, "").strip()
    if not value:
        raise UserError(f"{who}: environment variable {var} is not set; export the API key there")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise UserError(
            f"{who}: environment variable {var} holds whitespace or a control character inside "
            "the key (value not shown); re-export it as the key alone"
        )
    return value


def env_secret(var: str) -> list[str]:
    """What to scrub for the key in `var`: the stripped value (`Redactor` finds its other
    forms: escaped, URL-quoted, base64)."""
    value = os.environ.get(var, "").strip()
    return [value] if len(value) >= MIN_SECRET_LEN else []


def error_fields(resp: Response) -> dict[str, Any]:
    """`{"error": {...}}` (OpenAI, Google) as a dict; {} when the body has no such object."""
    try:
        body = json.loads(resp.body)
    except (ValueError, UnicodeDecodeError):
        return {}
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {}


class Options:
    """Validation of option values with one-line messages naming the component and option."""

    def __init__(self, who: str) -> None:
        self.who = who

    def fail(self, key: str, expected: str, got: Any, *, show: bool = True) -> UserError:
        """The error for a bad value; a value that may hold a credential is never shown."""
        if show and not SENSITIVE_NAME.search(key):
            found = f"got {got!r}"
        else:
            found = f"got a {type(got).__name__}, value not shown"
        return UserError(f"{self.who}: option '{key}' must be {expected} ({found})")

    def number(self, key: str, value: Any, *, minimum: float, above: bool = False) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (value <= minimum if above else value < minimum):
            raise self.fail(key, f"a number {'>' if above else '>='} {minimum:g}", value)
        return float(value)

    def integer(self, key: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < minimum or (maximum is not None and value > maximum):
            span = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise self.fail(key, f"an integer {span}", value)
        return int(value)

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def choice(self, key: str, value: Any, allowed: tuple[str, ...] | None) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or (allowed is not None and value not in allowed):
            raise self.fail(key, f"one of {', '.join(allowed)}" if allowed else "a string", value)
        return value


def check_transport(v: Options, c: Any) -> None:
    """The HTTP settings' values (timeout, attempts, backoff, rpm, concurrency) in range."""
    v.number("timeout", c.timeout, minimum=0, above=True)
    v.integer("max_attempts", c.max_attempts, minimum=1)
    v.number("backoff", c.backoff, minimum=0)
    v.number("max_backoff", c.max_backoff, minimum=0)
    if c.rpm is not None:
        v.number("rpm", c.rpm, minimum=0, above=True)
    v.integer("concurrency", c.concurrency, minimum=1)


def transport_client(name: str, c: Any) -> HttpClient:
    """The HTTP client of an API-backed component; `rpm` is the run's whole budget, so each
    of the run's processes paces at rpm / WORLD_SIZE."""
    return HttpClient(
        name,
        timeout=c.timeout,
        max_attempts=c.max_attempts,
        backoff=c.backoff,
        max_backoff=c.max_backoff,
        rpm=c.rpm / _world_size() if c.rpm else None,
        concurrency=c.concurrency,
    )


def transport_info(c: Any) -> dict[str, Any]:
    """The HTTP settings an API-backed component runs with, for its manifest entry."""
    return {
        "timeout": c.timeout,
        "max_attempts": c.max_attempts,
        "backoff": c.backoff,
        "max_backoff": c.max_backoff,
        "rpm": c.rpm,
        "processes": _world_size(),
        "concurrency": c.concurrency,
    }


def build_checked(cls: Any, options: dict[str, Any]) -> None:
    """Build `cls(**options)` only to check the values: no key read, no client built (every
    API-backed component's `check_options`, run before any run directory exists)."""
    token = _CHECK_ONLY.set(True)
    try:
        cls(**options)
    except TypeError as e:  # a wrong-typed value the constructor's own checks did not name
        raise UserError(f"{cls.name}: bad option value ({e})") from None
    finally:
        _CHECK_ONLY.reset(token)


@dataclass(kw_only=True, eq=False)
class ImageAPI:
    """Transport, placeholder check and decision plumbing shared by every image API."""

    name: ClassVar[str] = "api"
    provider: ClassVar[str] = ""
    weights: ClassVar[str] = "api"
    sends_seed: ClassVar[bool] = False

    timeout: float = 180.0
    """Seconds one attempt may take in all, connect to last byte (some models take minutes);
    a deadline, not a per-read limit, so a server that dribbles its answer cannot stall a run."""
    max_attempts: int = 5
    """HTTP attempts per item, the first included, before a transient failure is an error."""
    backoff: float = 2.0
    """First retry wait in seconds; doubles per retry, +-50% jitter, at least Retry-After."""
    max_backoff: float = 60.0
    """No single wait is longer, whatever Retry-After asks."""
    rpm: float | None = None
    """Requests per minute for this provider (retries included), evenly spaced; None: no limit.
    The whole run's budget: under torchrun each of WORLD_SIZE processes paces at rpm / WORLD_SIZE."""
    concurrency: int = 4
    """Requests in flight at once within a batch."""
    placeholder: bool = True
    """Refuse black or single-colour images (providers return them in place of filtered ones)."""

    def __post_init__(self) -> None:
        v = Options(self.name)
        check_transport(v, self)
        v.boolean("placeholder", self.placeholder)
        self._validate(v)
        if self.checking:
            return
        self.client = transport_client(self.name, self)

    @classmethod
    def listing(cls) -> str:
        """One line for `t2i-eval list` (what a user must give before it runs): by default the
        first line of the class docstring; providers with a key say which variable holds it."""
        return (cls.__doc__ or cls.name).strip().splitlines()[0]

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Validate option values as the constructor does, but need no key and build no client.

        Called by `validate_spec` before any run directory exists, so a bad value (a literal
        key above all) is rejected before the spec is written into a manifest."""
        build_checked(cls, options)

    @property
    def checking(self) -> bool:
        """Built by `check_options`: environment variables are not read."""
        return _CHECK_ONLY.get()

    # -- what each provider supplies -------------------------------------------------------

    def _validate(self, v: Options) -> None:
        """Check provider options (raise `v.fail(...)`)."""

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    def _body(self, text: str, seed: int) -> Any:
        raise NotImplementedError

    def _parse(self, resp: Response) -> Outcome:
        """Interpret a non-transient answer; raise TransientError for a malformed one."""
        raise NotImplementedError

    def _auth(self) -> dict[str, str]:
        """Credential headers, read from the environment now."""
        return {}

    def _headers(self) -> dict[str, str]:
        return dict(JSON_HEADERS)

    def _secrets(self) -> list[str]:
        """Values that must never appear in a record (scrubbed from messages and raw)."""
        return []

    def _options(self) -> dict[str, Any]:
        return {}

    @property
    def label(self) -> str:
        return ""

    # -- the Generator protocol ------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the manifest records of this generator: names and `${VAR}` references, never a
        credential (endpoints lose literal query values, headers their literal values)."""
        return redact_options({**self._info(), **self._info_extra()})

    def _info_extra(self) -> dict[str, Any]:
        return {}

    def _info(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.label,
            "endpoint": self.endpoint,
            "options": self._options(),
            "sends_seed": self.sends_seed,
            "placeholder_check": self.placeholder,
            "transport": transport_info(self),
        }

    def generate(self, texts: list[str], seeds: list[int]) -> list[GeneratorResult]:
        if len(texts) <= 1:
            return [self._one(t, s) for t, s in zip(texts, seeds, strict=True)]
        workers = min(self.concurrency, len(texts))
        with ThreadPoolExecutor(workers, thread_name_prefix=self.name) as pool:
            return list(pool.map(self._one, texts, seeds))

    def _one(self, text: str, seed: int) -> GeneratorResult:
        """One item's decision; never raises, so one broken answer never makes the System
        re-request (and re-pay for) the rest of the batch."""
        secrets = self._secrets()
        try:
            out = self._outcome(text, seed, secrets)
        except Exception as e:  # a bug or an answer nobody foresaw: an error, never a refusal
            out = Outcome(
                None,
                f"unexpected {type(e).__name__}: {e}",
                raw={"error": f"{type(e).__name__}: {e}", "unexpected": True},
            )
        raw = {
            "provider": self.provider,
            "model": self.label,
            "seed": seed,
            "seed_sent": self.sends_seed,
            **out.raw,
        }
        redact = Redactor(secrets)
        decision = StageDecision(
            "generator", self.name, out.refused, raw=redact.scrub(raw), message=redact(out.message)
        )
        return GeneratorResult(decision, out.image if out.refused is False else None)

    def _outcome(self, text: str, seed: int, secrets: list[str]) -> Outcome:
        try:
            out = self.client.request(
                self._method(),
                self._request_url(),
                self._parse_counted,
                body=json.dumps(self._body(text, seed)).encode(),
                headers=self._headers(),
                auth=self._auth,
                secrets=secrets,
            )
        except TransientError as e:
            out = Outcome(
                None,
                f"{e.message} (gave up after {e.attempts} attempt(s))",
                raw={"error": e.message, "attempts": e.attempts, "transient": True},
            )
        except UserError as e:  # not sent: missing key, redirect, insecure URL
            out = Outcome(None, str(e), raw={"error": str(e)})
        if out.refused is False and out.image is not None:
            stats = placeholder_stats(out.image)
            out.raw["image_stats"] = stats
            if self.placeholder and stats["kind"]:
                out = Outcome(True, _placeholder_message(stats), raw=out.raw)
        return out

    def _request_url(self) -> str:
        """The URL to send to (the `http` adapter resolves `${VAR}` in it here, only here)."""
        return self.endpoint

    def _method(self) -> str:
        return "POST"

    def _parse_counted(self, resp: Response) -> Outcome:
        out = self._parse(resp)
        out.raw.setdefault("http_status", resp.status)
        out.raw.setdefault("attempts", resp.attempt)
        return out

    def _image_at(self, ref: str) -> Image.Image:
        """An image from a data URI or a URL (downloaded without the key: it is another host).

        A download that fails is an error of this item, never a reason to generate (and pay
        for) the image again."""
        if ref.startswith("data:"):
            head, _, payload = ref.partition(",")
            if ";base64" not in head:
                raise TransientError("data URI is not base64")
            return decode_base64_image(payload)
        try:
            check_url(ref, f"{self.name} image URL", secret=False)
            return self.client.request("GET", ref, _download, paced=False)
        except (TransientError, UserError) as e:
            raise NoImage(f"image download failed: {e}") from None


def _download(resp: Response) -> Image.Image:
    if resp.status != 200:
        raise NoImage(f"image download answered HTTP {resp.status}")
    return decode_image(resp.body)


def _placeholder_message(stats: dict[str, Any]) -> str:
    if stats["kind"] == "black":
        return (
            f"black image returned (mean luminance {stats['mean_luminance']} <= "
            f"{BLACK_MAX_MEAN:g}): a filtered result, not a picture"
        )
    return (
        f"single flat-colour image returned (luminance std {stats['luminance_std']} <= "
        f"{FLAT_MAX_STD:g}): a placeholder, not a picture"
    )


@dataclass(kw_only=True, eq=False)
class KeyedAPI(ImageAPI):
    """A hosted provider: a model, a base URL and the variable that holds the key."""

    key_header: ClassVar[str] = "Authorization"
    key_prefix: ClassVar[str] = "Bearer "

    model: str = ""
    """The provider's model id."""
    base_url: str = ""
    """The API root; point it at a local server to test."""
    api_key_env: str | None = None
    """Environment variable holding the key (read per request, never stored); null: send none."""

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str):
            raise UserError(f"{self.name}: option 'base_url' must be a URL (got {self.base_url!r})")
        if not isinstance(self.model, str) or not _MODEL_ID.match(self.model):
            raise UserError(f"{self.name}: option 'model' must be a model id (got {self.model!r})")
        if self.api_key_env is not None and not (
            isinstance(self.api_key_env, str)
            and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env)
        ):
            raise UserError(
                f"{self.name}: option 'api_key_env' must name an environment variable, e.g. "
                "MY_API_KEY (the value is not shown: the key itself never goes in a spec)"
            )
        super().__post_init__()  # option values first: a typo is reported before a missing key
        check_url(self.base_url, f"{self.name}: base_url", secret=bool(self.api_key_env))
        if self.api_key_env and not self.checking:
            read_key(self.api_key_env, self.name)  # missing or damaged: say so before any work

    @classmethod
    def listing(cls) -> str:
        """`model M; key $VAR` from the constructor's defaults, so it cannot drift from the code."""
        defaults = {f.name: f.default for f in fields(cls)}
        key = defaults["api_key_env"]
        return f"model {defaults['model']}; " + (f"key ${key}" if key else "no key")

    @property
    def label(self) -> str:
        return self.model

    def _auth(self) -> dict[str, str]:
        if not self.api_key_env:
            return {}
        return {self.key_header: f"{self.key_prefix}{read_key(self.api_key_env, self.name)}"}

    def _secrets(self) -> list[str]:
        return env_secret(self.api_key_env) if self.api_key_env else []

    def _info_extra(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "api_key_env": self.api_key_env}
