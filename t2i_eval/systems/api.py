"""Image APIs as generators: OpenAI Images, Google Imagen (Gemini API), fal FLUX, and a generic
HTTP adapter configured by a spec.

What each answer means, per provider (from the providers' API references):
- OpenAI `/images/generations` (`dall-e-3`, `gpt-image-1`): an error whose code is
  `content_policy_violation` or `moderation_blocked` is a refusal; `data[].b64_json` holds the
  image and DALL-E 3's `revised_prompt` the prompt it actually drew.
- Imagen `models/MODEL:predict`: `predictions[].bytesBase64Encoded` holds the image; a filtered
  image comes back as a prediction with `raiFilteredReason`, or not at all (no `predictions`);
  a prompt blocked up front is a 400 whose message cites Google's Responsible AI practices.
- fal `fal-ai/flux-pro/v1.1`: `has_nsfw_concepts[i]` true means the safety checker replaced
  image i with a black one; a 422 whose `detail[].type` is `content_policy_violation` is a refusal.

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
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, unquote, urlparse

import numpy as np
from PIL import Image

from ..errors import UserError
from ..net import (
    ENV_REF,
    MIN_SECRET_LEN,
    REDACTED,
    SENSITIVE_NAME,
    SENSITIVE_QUERY,
    HttpClient,
    Redactor,
    Response,
    TransientError,
    check_url,
    is_reference,
    redact_options,
)
from ..types import StageDecision
from .base import GeneratorResult

_JSON = {"Content-Type": "application/json", "Accept": "application/json"}
_ENV_REF = ENV_REF
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


class _NoImage(Exception):
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


def _env_secret(var: str) -> list[str]:
    """What to scrub for the key in `var`: the stripped value (`Redactor` finds its other
    forms: escaped, URL-quoted, base64)."""
    value = os.environ.get(var, "").strip()
    return [value] if len(value) >= MIN_SECRET_LEN else []


def _error_fields(resp: Response) -> dict[str, Any]:
    """`{"error": {...}}` (OpenAI, Google) as a dict; {} when the body has no such object."""
    try:
        body = json.loads(resp.body)
    except (ValueError, UnicodeDecodeError):
        return {}
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {}


class _Options:
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
        v = _Options(self.name)
        v.number("timeout", self.timeout, minimum=0, above=True)
        v.integer("max_attempts", self.max_attempts, minimum=1)
        v.number("backoff", self.backoff, minimum=0)
        v.number("max_backoff", self.max_backoff, minimum=0)
        if self.rpm is not None:
            v.number("rpm", self.rpm, minimum=0, above=True)
        v.integer("concurrency", self.concurrency, minimum=1)
        v.boolean("placeholder", self.placeholder)
        self._validate(v)
        if self.checking:
            return
        self.client = HttpClient(
            self.name,
            timeout=self.timeout,
            max_attempts=self.max_attempts,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            rpm=self.rpm / _world_size() if self.rpm else None,
            concurrency=self.concurrency,
        )

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Validate option values as the constructor does, but need no key and build no client.

        Called by `validate_spec` before any run directory exists, so a bad value (a literal
        key above all) is rejected before the spec is written into a manifest."""
        token = _CHECK_ONLY.set(True)
        try:
            cls(**options)
        except TypeError as e:  # a wrong-typed value the checks above did not name
            raise UserError(f"{cls.name}: bad option value ({e})") from None
        finally:
            _CHECK_ONLY.reset(token)

    @property
    def checking(self) -> bool:
        """Built by `check_options`: environment variables are not read."""
        return _CHECK_ONLY.get()

    # -- what each provider supplies -------------------------------------------------------

    def _validate(self, v: _Options) -> None:
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
        return dict(_JSON)

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
            "transport": {
                "timeout": self.timeout,
                "max_attempts": self.max_attempts,
                "backoff": self.backoff,
                "max_backoff": self.max_backoff,
                "rpm": self.rpm,
                "processes": _world_size(),
                "concurrency": self.concurrency,
            },
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
            raise _NoImage(f"image download failed: {e}") from None


def _download(resp: Response) -> Image.Image:
    if resp.status != 200:
        raise _NoImage(f"image download answered HTTP {resp.status}")
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
class _KeyedAPI(ImageAPI):
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

    @property
    def label(self) -> str:
        return self.model

    def _auth(self) -> dict[str, str]:
        if not self.api_key_env:
            return {}
        return {self.key_header: f"{self.key_prefix}{read_key(self.api_key_env, self.name)}"}

    def _secrets(self) -> list[str]:
        return _env_secret(self.api_key_env) if self.api_key_env else []

    def _info_extra(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "api_key_env": self.api_key_env}


#: Documented values per known model; other models pass their options through unchecked.
_OPENAI_MODELS: dict[str, dict[str, tuple[str, ...]]] = {
    "dall-e-3": {
        "size": ("1024x1024", "1792x1024", "1024x1792"),
        "quality": ("standard", "hd"),
        "style": ("vivid", "natural"),
    },
    "gpt-image-1": {
        "size": ("auto", "1024x1024", "1536x1024", "1024x1536"),
        "quality": ("auto", "low", "medium", "high"),
        "moderation": ("auto", "low"),
    },
}
_OPENAI_POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
#: Older answers carry no code, only this documented sentence. Nothing broader: a 400 about
#: the `moderation` parameter itself is a configuration error, not a refusal.
_OPENAI_POLICY_TEXT = re.compile(
    r"your request was rejected as a result of our safety system", re.IGNORECASE
)


@dataclass(kw_only=True, eq=False)
class OpenAIImages(_KeyedAPI):
    """OpenAI Images API (`dall-e-3`, `gpt-image-1`). No seed parameter exists."""

    name: ClassVar[str] = "openai-images"
    provider: ClassVar[str] = "openai"

    model: str = "dall-e-3"
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = "OPENAI_API_KEY"
    size: str | None = None
    """e.g. 1024x1024 (dall-e-3 also 1792x1024, 1024x1792; gpt-image-1 1536x1024, 1024x1536)."""
    quality: str | None = None
    """dall-e-3: standard|hd; gpt-image-1: low|medium|high|auto."""
    style: str | None = None
    """dall-e-3 only: vivid|natural."""
    moderation: str | None = None
    """gpt-image-1 only: auto|low (how strict OpenAI's moderation of the request is)."""

    def _validate(self, v: _Options) -> None:
        known = _OPENAI_MODELS.get(self.model)
        for key in ("size", "quality", "style", "moderation"):
            value = getattr(self, key)
            if known is not None and value is not None and key not in known:
                models = [m for m, opts in _OPENAI_MODELS.items() if key in opts]
                raise UserError(
                    f"{self.name}: option '{key}' is not supported by {self.model} "
                    f"(only by {', '.join(models)})"
                )
            v.choice(key, value, known.get(key) if known else None)

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/images/generations"

    def _body(self, text: str, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": text, "n": 1}
        if self.model.startswith("dall-e"):
            body["response_format"] = "b64_json"  # the GPT image models always answer base64
        for key in ("size", "quality", "style", "moderation"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        return body

    def _options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("size", "quality", "style", "moderation")}

    def _parse(self, resp: Response) -> Outcome:
        if resp.status >= 400:
            err = _error_fields(resp)
            code = err.get("code")
            message = str(err.get("message") or resp.snippet())
            raw = {"code": code, "error_type": err.get("type")}
            policy = code in _OPENAI_POLICY_CODES or (
                not code and resp.status == 400 and bool(_OPENAI_POLICY_TEXT.search(message))
            )
            if policy:
                return Outcome(True, message, raw=raw)
            return Outcome(None, f"HTTP {resp.status}: {message}", raw=raw)
        body = resp.json()
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise TransientError("malformed body: no 'data' list of images")
        if not data:
            return Outcome(True, "OpenAI returned no image", raw={"missing_image": True})
        item = data[0]
        raw: dict[str, Any] = {}
        if item.get("revised_prompt") is not None:
            raw["revised_prompt"] = item["revised_prompt"]
        try:
            if item.get("b64_json"):
                return Outcome(False, image=decode_base64_image(item["b64_json"]), raw=raw)
            if item.get("url"):
                if not isinstance(item["url"], str):
                    raise TransientError("malformed body: 'url' is not text")
                return Outcome(False, image=self._image_at(item["url"]), raw=raw)
        except _NoImage as e:
            return Outcome(None, str(e), raw=raw)
        return Outcome(True, "OpenAI returned no image", raw={**raw, "missing_image": True})


_IMAGEN_SAFETY = ("block_low_and_above", "block_medium_and_above", "block_only_high", "block_none")
_IMAGEN_PEOPLE = ("dont_allow", "allow_adult", "allow_all")
_IMAGEN_ASPECT = ("1:1", "3:4", "4:3", "9:16", "16:9")
#: A prompt Imagen blocks before generating is a 400 in Google's documented wording: "The
#: prompt could not be submitted. This prompt contains sensitive words that violate Google's
#: Responsible AI practices." Only those phrases count; a bare "blocked" or "safety setting"
#: is as likely to be a configuration error.
_IMAGEN_POLICY_TEXT = re.compile(
    r"could ?n[o']t be submitted|responsible ai practices|sensitive words|\bviolates?\b",
    re.IGNORECASE,
)
#: A 400 about what the key or project may use (a safety level or person setting outside its
#: allowlist, an invalid value): a configuration error to fix, never a refusal, whatever words
#: it shares with one. It would otherwise show up as a 100% refusal rate.
_IMAGEN_CONFIG_TEXT = re.compile(
    r"not allowed|allowlist|allow ?list|invalid value|not supported|is only (supported|"
    r"accessible|available)|safety_?filter_?level|safety_?setting|person_?generation",
    re.IGNORECASE,
)


@dataclass(kw_only=True, eq=False)
class Imagen(_KeyedAPI):
    """Google Imagen through the Gemini API's `:predict` endpoint.

    The Gemini API takes no seed (only Vertex AI does, with watermarking off), so none is sent.
    """

    name: ClassVar[str] = "imagen"
    provider: ClassVar[str] = "google"
    key_header: ClassVar[str] = "x-goog-api-key"
    key_prefix: ClassVar[str] = ""

    model: str = "imagen-3.0-generate-002"
    base_url: str = "https://generativelanguage.googleapis.com/v1beta"
    api_key_env: str | None = "GEMINI_API_KEY"
    safety_filter_level: str | None = None
    """block_low_and_above | block_medium_and_above | block_only_high | block_none (sent as
    `safetySetting`; which levels a key may use is the provider's decision)."""
    person_generation: str | None = None
    """dont_allow | allow_adult | allow_all."""
    aspect_ratio: str | None = None
    """1:1 | 3:4 | 4:3 | 9:16 | 16:9."""

    def _validate(self, v: _Options) -> None:
        v.choice("safety_filter_level", self.safety_filter_level, _IMAGEN_SAFETY)
        v.choice("person_generation", self.person_generation, _IMAGEN_PEOPLE)
        v.choice("aspect_ratio", self.aspect_ratio, _IMAGEN_ASPECT)

    @property
    def endpoint(self) -> str:
        return f"{self.base_url.rstrip('/')}/models/{self.model}:predict"

    def _body(self, text: str, seed: int) -> dict[str, Any]:
        params: dict[str, Any] = {"sampleCount": 1, "includeRaiReason": True}
        for key, api_key in (
            ("safety_filter_level", "safetySetting"),
            ("person_generation", "personGeneration"),
            ("aspect_ratio", "aspectRatio"),
        ):
            if getattr(self, key) is not None:
                params[api_key] = getattr(self, key)
        return {"instances": [{"prompt": text}], "parameters": params}

    def _options(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("safety_filter_level", "person_generation", "aspect_ratio")
        }

    def _parse(self, resp: Response) -> Outcome:
        if resp.status >= 400:
            err = _error_fields(resp)
            message = str(err.get("message") or resp.snippet())
            raw = {"error_status": err.get("status")}
            policy = _IMAGEN_POLICY_TEXT.search(message) and not _IMAGEN_CONFIG_TEXT.search(message)
            if resp.status == 400 and policy:
                return Outcome(True, message, raw=raw)
            return Outcome(None, f"HTTP {resp.status}: {message}", raw=raw)
        body = resp.json()
        preds = body.get("predictions", []) if isinstance(body, dict) else None
        if not isinstance(preds, list) or not all(isinstance(p, dict) for p in preds):
            raise TransientError("malformed body: 'predictions' is not a list of objects")
        images = [p for p in preds if p.get("bytesBase64Encoded")]
        reasons = [str(p["raiFilteredReason"]) for p in preds if p.get("raiFilteredReason")]
        if images:
            first = images[0]
            raw = {k: first[k] for k in ("prompt", "safetyAttributes") if k in first}
            if "prompt" in raw:
                raw["revised_prompt"] = raw.pop("prompt")
            return Outcome(False, image=decode_base64_image(first["bytesBase64Encoded"]), raw=raw)
        if reasons:
            return Outcome(True, reasons[0], raw={"rai_filtered_reason": reasons[0]})
        return Outcome(
            True,
            "Imagen returned no image (the Gemini API leaves filtered images out of 'predictions')",
            raw={"missing_image": True},
        )


_FAL_SIZES = (
    "square_hd",
    "square",
    "portrait_4_3",
    "portrait_16_9",
    "landscape_4_3",
    "landscape_16_9",
)


@dataclass(kw_only=True, eq=False)
class FalFlux(_KeyedAPI):
    """FLUX1.1 [pro] on fal (`fal-ai/flux-pro/v1.1`), synchronous endpoint; the seed is sent."""

    name: ClassVar[str] = "fal"
    provider: ClassVar[str] = "fal"
    key_prefix: ClassVar[str] = "Key "
    sends_seed: ClassVar[bool] = True

    model: str = "fal-ai/flux-pro/v1.1"
    base_url: str = "https://fal.run"
    api_key_env: str | None = "FAL_KEY"
    safety_tolerance: int = 2
    """1 (strictest) .. 6 (most permissive); API-only setting of the FLUX pro models."""
    enable_safety_checker: bool = True
    """fal's image safety checker: a flagged image comes back black with has_nsfw_concepts."""
    image_size: str | None = None
    """square_hd | square | portrait_4_3 | portrait_16_9 | landscape_4_3 | landscape_16_9."""
    sync_mode: bool = True
    """Ask for the image inline (data URI) instead of a CDN URL to download."""

    def _validate(self, v: _Options) -> None:
        v.integer("safety_tolerance", self.safety_tolerance, minimum=1, maximum=6)
        v.boolean("enable_safety_checker", self.enable_safety_checker)
        v.choice("image_size", self.image_size, _FAL_SIZES)
        v.boolean("sync_mode", self.sync_mode)

    @property
    def endpoint(self) -> str:
        return f"{self.base_url.rstrip('/')}/{self.model}"

    def _body(self, text: str, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": text,
            "seed": seed,
            "num_images": 1,
            "safety_tolerance": str(self.safety_tolerance),  # the API's enum is "1".."6"
            "enable_safety_checker": self.enable_safety_checker,
            "sync_mode": self.sync_mode,
        }
        if self.image_size is not None:
            body["image_size"] = self.image_size
        return body

    def _options(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("safety_tolerance", "enable_safety_checker", "image_size", "sync_mode")
        }

    def _parse(self, resp: Response) -> Outcome:
        if resp.status >= 400:
            detail = _fal_detail(resp)
            types = [d.get("type") for d in detail]
            messages = [str(d.get("msg", "")) for d in detail if d.get("msg")]
            raw = {"error_types": types}
            if "content_policy_violation" in types:
                i = types.index("content_policy_violation")
                return Outcome(
                    True, str(detail[i].get("msg") or "content_policy_violation"), raw=raw
                )
            message = "; ".join(messages) or resp.snippet()
            return Outcome(None, f"HTTP {resp.status}: {message}", raw=raw)
        body = resp.json()
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
            raise TransientError("malformed body: no 'images' list")
        nsfw = body.get("has_nsfw_concepts") or []
        raw = {"has_nsfw_concepts": nsfw, "provider_seed": body.get("seed")}
        if not images:
            return Outcome(True, "fal returned no image", raw={**raw, "missing_image": True})
        if isinstance(nsfw, list) and nsfw and nsfw[0] is True:
            return Outcome(
                True,
                "fal's safety checker flagged the image (has_nsfw_concepts: true) and returned "
                "a black image in its place",
                raw=raw,
            )
        url = images[0].get("url")
        if not isinstance(url, str) or not url:
            raise TransientError("malformed body: image without a 'url' string")
        try:
            return Outcome(False, image=self._image_at(url), raw=raw)
        except _NoImage as e:
            return Outcome(None, str(e), raw=raw)


def _lost(who: str, what: str) -> UserError:
    """A spec read back from a run's manifest, which keeps no literal values (see
    `net.redact_options`): it cannot be sent as it was."""
    return UserError(
        f"{who}: {what} reads '{REDACTED}': a run's manifest keeps only names and ${{VAR}} "
        "references, so a spec read back from one (e.g. by `t2i-eval rewrite`) has lost that "
        "value; write it as '${MY_VAR}' in the system spec, export MY_VAR, and run again"
    )


def _fal_detail(resp: Response) -> list[dict[str, Any]]:
    """fal's error body: `{"detail": [{"loc", "msg", "type", ...}]}` (or a plain string)."""
    try:
        body = json.loads(resp.body)
    except (ValueError, UnicodeDecodeError):
        return []
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return [{"msg": detail}]
    return [d for d in detail if isinstance(d, dict)] if isinstance(detail, list) else []


@dataclass(kw_only=True, eq=False)
class HttpImageAPI(ImageAPI):
    """Any JSON image API, described by values only (STYLE.md 5: no code in config).

    The request is `method url` with `headers` (values may hold `${ENV_VAR}`, resolved per
    request and never stored; so may the URL's path and query, for APIs that take the key as
    `?key=...`) and a JSON `body` template whose strings may hold `{prompt}` and
    `{seed}` (a string that is exactly `"{seed}"` becomes a number). The image is the value at
    the dotted `image_path`: base64, a data URI or a URL. A refusal is an answer whose HTTP
    status is in `refuse_status`, or whose text at `message_path` matches `refuse_match`.
    """

    name: ClassVar[str] = "http"
    provider: ClassVar[str] = "http"

    url: str = ""
    """The endpoint (https, unless the host is this machine or nothing secret is sent); a key
    in the query only as a reference, e.g. `https://host/gen?key=${MY_API_KEY}`."""
    method: str = "POST"
    """POST or PUT."""
    headers: dict[str, str] | None = None
    """Extra headers; credentials only as `${ENV_VAR}` references."""
    body: Any = None
    """JSON template with `{prompt}` (required) and optionally `{seed}`; default {prompt: ...}."""
    image_path: str = ""
    """Dotted path to the image in the answer, e.g. `data.0.b64_json` or `images.0.url`."""
    message_path: str | None = None
    """Dotted path to the provider's message (refusal text), e.g. `error.message`."""
    refuse_status: list[int] | None = None
    """HTTP statuses that mean a policy refusal, e.g. [451]."""
    refuse_match: str | None = None
    """Regex on the text at `message_path` that means a refusal (any status)."""
    refuse_missing_image: bool = False
    """A success answer without an image is a refusal (else an error)."""
    model: str = ""
    """A label for reports (the model behind the endpoint)."""

    def _validate(self, v: _Options) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise v.fail("url", "the endpoint URL", self.url, show=False)
        if not isinstance(self.method, str) or self.method.upper() not in ("POST", "PUT"):
            raise v.fail("method", "POST or PUT", self.method)
        self.method = self.method.upper()
        self._check_headers(v)
        self._check_url()
        self._check_missing_env()
        self._check_body(v)
        if not isinstance(self.image_path, str) or not self.image_path:
            raise v.fail("image_path", "a dotted path such as data.0.b64_json", self.image_path)
        self._check_refusal_rules(v)

    def _check_headers(self, v: _Options) -> None:
        """Credentials only as ${VAR} references: the spec is written into every manifest."""
        if self.headers is None:
            self.headers = {}
        if not isinstance(self.headers, dict) or not all(
            isinstance(k, str) and isinstance(val, str) for k, val in self.headers.items()
        ):  # never echoed: a header value may be a key
            raise v.fail("headers", "a mapping of header name -> string", self.headers, show=False)
        for key, value in self.headers.items():
            if REDACTED in value:
                raise _lost(self.name, f"header '{key}'")
            if SENSITIVE_NAME.search(key) and not is_reference(value):
                raise UserError(
                    f"{self.name}: header '{key}' holds a literal value; write it as "
                    f"'${{MY_API_KEY}}' (e.g. 'Bearer ${{MY_API_KEY}}') and export MY_API_KEY, so "
                    "the key is never written into the run's manifest"
                )

    def _check_url(self) -> None:
        """`${VAR}` only in the path and query; a sensitive query parameter only as one."""
        what = f"{self.name}: url"
        if REDACTED in unquote(self.url):
            raise _lost(self.name, "a value in the url")
        parsed = urlparse(self.url)
        if "${" in f"{parsed.scheme}://{parsed.netloc}":
            raise UserError(f"{what}: environment variables may appear in the path and query only")
        for name, value in parse_qsl(parsed.query, keep_blank_values=True):
            if SENSITIVE_QUERY.search(name) and not _ENV_REF.fullmatch(value):
                raise UserError(
                    f"{what}: query parameter '{name}' holds a literal value; write it as "
                    f"'{name}=${{MY_API_KEY}}' and export MY_API_KEY, so the key is never "
                    "written into the run's manifest"
                )
        check_url(self.url, what, secret=bool(self._env_refs()))

    def _check_missing_env(self) -> None:
        if self.checking:
            return
        for var in dict.fromkeys(self._env_refs()):
            read_key(var, self.name)

    def _check_body(self, v: _Options) -> None:
        if self.body is None:
            self.body = {"prompt": "{prompt}"}
        try:
            template = json.dumps(self.body)
        except (TypeError, ValueError):
            raise v.fail(
                "body", "a JSON value (mapping, list or string)", self.body, show=False
            ) from None
        if "{prompt}" not in template:
            raise v.fail("body", "a template containing {prompt}", redact_options(self.body))
        if "${" in template:
            raise UserError(
                f"{self.name}: the body template holds '${{...}}'; environment variables are "
                "resolved in headers and the URL only (put the key in a header)"
            )
        if redact_options(self.body) != self.body:
            raise UserError(
                f"{self.name}: the body template holds a literal value under a credential-like "
                "name (value not shown); send the key in a header as '${MY_API_KEY}', so it is "
                "never written into the run's manifest"
            )
        self.sends_seed = "{seed}" in template

    def _check_refusal_rules(self, v: _Options) -> None:
        if self.message_path is not None and not isinstance(self.message_path, str):
            raise v.fail("message_path", "a dotted path such as error.message", self.message_path)
        statuses = self.refuse_status or []
        if not isinstance(statuses, list) or not all(
            isinstance(s, int) and (200 <= s < 300 or 400 <= s < 500) and s not in (408, 429)
            for s in statuses
        ):
            raise v.fail(
                "refuse_status",
                "a list of 2xx/4xx statuses (408, 429 and 5xx are always retried)",
                self.refuse_status,
            )
        self.refuse_status = statuses
        self._refuse_re = None
        if self.refuse_match is not None:
            if self.message_path is None:
                raise UserError(f"{self.name}: option 'refuse_match' needs 'message_path'")
            try:
                self._refuse_re = re.compile(self.refuse_match)
            except (re.error, TypeError):
                raise v.fail(
                    "refuse_match", "a valid regular expression", self.refuse_match
                ) from None
        v.boolean("refuse_missing_image", self.refuse_missing_image)

    def _env_refs(self) -> list[str]:
        """Variables named in the headers and the URL (each holds a credential)."""
        values = [*(self.headers or {}).values(), self.url]
        return [r for value in values for r in _ENV_REF.findall(value)]

    @property
    def endpoint(self) -> str:
        """The URL template (`${VAR}` unresolved): what info() and manifests show."""
        return self.url

    def _request_url(self) -> str:
        return _ENV_REF.sub(lambda m: quote(read_key(m.group(1), self.name), safe=""), self.url)

    @property
    def label(self) -> str:
        return self.model

    def _method(self) -> str:
        return self.method

    def _headers(self) -> dict[str, str]:
        plain = {k: v for k, v in (self.headers or {}).items() if not _ENV_REF.search(v)}
        return {**_JSON, **plain}

    def _auth(self) -> dict[str, str]:
        out = {}
        for key, value in (self.headers or {}).items():
            if _ENV_REF.search(value):
                out[key] = _ENV_REF.sub(lambda m: self._env(m.group(1)), value)
        return out

    def _env(self, var: str) -> str:
        return read_key(var, self.name)

    def _secrets(self) -> list[str]:
        """The keys in the variables it names, and every literal header and query value: a
        key can sit under any name (`X-Api: KEY`, `?code=KEY`), and an echo of one is scrubbed
        as an echo of a key is."""
        keys = [s for var in dict.fromkeys(self._env_refs()) for s in _env_secret(var)]
        literals = [v for v in (self.headers or {}).values() if not _ENV_REF.search(v)]
        literals += [
            v for _, v in parse_qsl(urlparse(self.url).query) if v and not _ENV_REF.search(v)
        ]
        return [*keys, *(v for v in literals if len(v) >= MIN_SECRET_LEN)]

    def _body(self, text: str, seed: int) -> Any:
        def fill(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: fill(v) for k, v in node.items()}
            if isinstance(node, list):
                return [fill(v) for v in node]
            if node == "{seed}":
                return seed
            if isinstance(node, str):
                return node.replace("{prompt}", text).replace("{seed}", str(seed))
            return node

        return fill(self.body)

    def _info_extra(self) -> dict[str, Any]:
        return {"method": self.method}

    def _options(self) -> dict[str, Any]:
        return {  # templates: ${VAR} references, never values (info() redacts the rest)
            "headers": dict(self.headers or {}),
            "body": self.body,
            "image_path": self.image_path,
            "message_path": self.message_path,
            "refuse_status": self.refuse_status,
            "refuse_match": self.refuse_match,
            "refuse_missing_image": self.refuse_missing_image,
        }

    def _parse(self, resp: Response) -> Outcome:
        try:
            body = json.loads(resp.body)
        except (ValueError, UnicodeDecodeError):
            body = None
        message = dig(body, self.message_path) if self.message_path and body is not None else None
        text = str(message) if message is not None else ""
        if resp.status in (self.refuse_status or []):
            return Outcome(True, text or resp.snippet() or f"HTTP {resp.status}")
        if self._refuse_re is not None and text and self._refuse_re.search(text):
            return Outcome(True, text)
        if resp.status >= 400:
            return Outcome(None, f"HTTP {resp.status}: {text or resp.snippet()}")
        if body is None:
            raise TransientError(f"malformed JSON body (HTTP {resp.status})")
        value = dig(body, self.image_path)
        if value is not None and not isinstance(value, str):
            raise TransientError(
                f"malformed body: '{self.image_path}' is {type(value).__name__}, not text"
            )
        if not value:
            note = f"no image at '{self.image_path}'"
            if self.refuse_missing_image:
                return Outcome(True, text or note, raw={"missing_image": True})
            return Outcome(None, note, raw={"missing_image": True})
        try:
            if value.startswith(("data:", "http://", "https://")):
                return Outcome(False, image=self._image_at(value))
            return Outcome(False, image=decode_base64_image(value))
        except _NoImage as e:
            return Outcome(None, str(e))
