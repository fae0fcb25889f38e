"""OpenAI's moderation endpoint (`omni-moderation-latest`) as a prompt guard and an image guard.

`POST {base_url}/moderations` with `{"model": M, "input": [...]}` answers one result per input
with a score in [0, 1] for each of OpenAI's categories and its own `flagged`. The guard decides
from the scores, not from `flagged`: refuse when any category's score > its threshold
(`threshold` for all, or per category through `thresholds: {CATEGORY: T}`), so a run can be
re-decided at other thresholds from what it stored (`decide`). `raw` keeps every category score,
the API's own `flagged` (recorded, never deciding) and, per OVERT category of the
`openai-moderation` taxonomy (prompts/taxonomies.yaml), its highest score, so a report can say
which OVERT category triggered.

Text inputs go `batch_size` to a request; images one per request (the documented limit), as a
PNG data URL. Transport is `net.HttpClient`, as for the image APIs (`api/base.py`): rate limits,
5xx, timeouts and malformed bodies are retried; when they persist, the input "could not be
checked" (refused None with the reason: the chain makes it an error, or a labelled pass/refusal
under `on_error`), never a refusal. A batch answered with a non-transient error (a 400 about one
input) is asked again input by input, so one bad prompt cannot sink the others; a transient
failure is not (it is the server's, not an input's, and splitting would multiply the waits).
The key is read from `api_key_env` per request and never stored: messages and raw are scrubbed.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..errors import UserError, did_you_mean
from ..net import Redactor, Response, TransientError, check_url, redact_options
from ..suite_spec import load_taxonomy
from ..types import StageDecision, StageKind
from .api.base import (
    _CHECK_ONLY,
    JSON_HEADERS,
    Options,
    build_checked,
    check_transport,
    env_secret,
    error_fields,
    read_key,
    transport_client,
    transport_info,
)
from .thresholds import check_file_option, file_info, read_thresholds, scalar_threshold

#: The categories `omni-moderation-latest` scores (OpenAI's moderation guide); `thresholds`
#: keys must be among them. A category the API adds later is scored at `threshold`.
CATEGORIES: tuple[str, ...] = (
    "sexual",
    "sexual/minors",
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "violence",
    "violence/graphic",
)
#: The taxonomy (prompts/taxonomies.yaml) that maps these names to OVERT's categories.
TAXONOMY = "openai-moderation"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9._\-/]+$")


def decide(
    scores: Mapping[str, float], thresholds: Mapping[str, float], default: float
) -> dict[str, Any]:
    """The rule on stored numbers: refuse when any category's score > its threshold
    (`thresholds[c]`, else `default`).

    With no per-category thresholds, `score` is the highest category score and `threshold` is
    `default`. With some, `score` is the largest margin max_c(s_c - t_c) and `threshold` 0, so
    that one number still orders inputs and `refused == score > threshold` either way (for
    finite floats s - t > 0 exactly when s > t)."""
    limits = {c: float(thresholds.get(c, default)) for c in scores}
    triggered = [c for c, s in scores.items() if s > limits[c]]
    if thresholds:
        score, threshold = max(s - limits[c] for c, s in scores.items()), 0.0
    else:
        score, threshold = max(scores.values()), float(default)
    return {
        "refused": bool(triggered),
        "triggered": triggered,
        "score": score,
        "threshold": threshold,
        "limits": limits,
    }


class _Unusable(Exception):
    """A non-transient answer that holds no scores (a 400, a 401): an error, never a refusal."""


@dataclass(kw_only=True, eq=False)
class _Moderation:
    """What the prompt guard and the image guard share: options, transport, the decision."""

    name: ClassVar[str] = "moderation"
    weights: ClassVar[str] = "api"
    stage: ClassVar[StageKind]

    model: str = "omni-moderation-latest"
    """OpenAI's moderation model id."""
    base_url: str = "https://api.openai.com/v1"
    """The API root (an OpenAI-compatible server's too); point it at a local server to test."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the key (read per request, never stored); null: send none."""
    threshold: float = 0.5
    """Refuse when a category's score > this (categories not in `thresholds`)."""
    thresholds: dict[str, float] | str | None = None
    """Per-category thresholds `{sexual: 0.3, ...}` (OpenAI's names), or FILE: a sweep's
    calibrated threshold for this guard in place of `threshold` (`systems/thresholds.py`)."""
    timeout: float = 60.0
    """Seconds one attempt may take in all, connect to last byte."""
    max_attempts: int = 5
    """HTTP attempts per request, the first included, before a transient failure is an error."""
    backoff: float = 2.0
    """First retry wait in seconds; doubles per retry, +-50% jitter, at least Retry-After."""
    max_backoff: float = 60.0
    """No single wait is longer, whatever Retry-After asks."""
    rpm: float | None = None
    """Requests per minute (retries included), evenly spaced; None: no limit. Under torchrun
    each of WORLD_SIZE processes paces at rpm / WORLD_SIZE."""
    concurrency: int = 4
    """Requests in flight at once."""

    def __post_init__(self) -> None:
        self._check_values()
        self.per_category: dict[str, float] = {}
        self.from_file = None
        if isinstance(self.thresholds, dict):
            self.per_category = {k: float(v) for k, v in self.thresholds.items()}
        elif isinstance(self.thresholds, str) and not self.checking:
            self.from_file = read_thresholds(self.thresholds, self.name)
        self.default = scalar_threshold(self.from_file, self.threshold)
        if self.checking:
            return
        self.overt = load_taxonomy(TAXONOMY)
        self.client = transport_client(f"{self.name} {self.stage.replace('_', ' ')}", self)
        if self.api_key_env:
            read_key(self.api_key_env, self.name)  # missing or damaged: say so before any work

    def _check_values(self) -> None:
        v = Options(self.name)
        if not isinstance(self.model, str) or not _MODEL_ID.match(self.model):
            raise v.fail("model", "a model id such as omni-moderation-latest", self.model)
        if not isinstance(self.base_url, str):
            raise v.fail("base_url", "a URL", self.base_url)
        if self.api_key_env is not None and not (
            isinstance(self.api_key_env, str) and _ENV_NAME.match(self.api_key_env)
        ):
            raise UserError(
                f"{self.name}: option 'api_key_env' must name an environment variable, e.g. "
                "OPENAI_API_KEY (the value is not shown: the key itself never goes in a spec)"
            )
        self._probability(v, "threshold", self.threshold)
        if isinstance(self.thresholds, dict):
            for key, value in self.thresholds.items():
                if key not in CATEGORIES:
                    raise UserError(
                        f"{self.name}: option 'thresholds' has no category {key!r}."
                        f"{did_you_mean(str(key), CATEGORIES)} Categories: {', '.join(CATEGORIES)}"
                    )
                self._probability(v, f"thresholds.{key}", value)
        elif self.thresholds is not None and not isinstance(self.thresholds, str):
            raise v.fail("thresholds", "a mapping CATEGORY: THRESHOLD or a file", self.thresholds)
        check_transport(v, self)
        check_url(self.base_url, f"{self.name}: base_url", secret=bool(self.api_key_env))

    @staticmethod
    def _probability(v: Options, key: str, value: Any) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not 0.0 <= value <= 1.0:
            raise v.fail(key, "a number from 0 to 1 (a category score's scale)", value)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Validate option values (and a thresholds file) as the constructor does, reading no
        key and building no client: run before any run directory exists."""
        if isinstance(options.get("thresholds"), str):
            check_file_option(cls.name, options)
        build_checked(cls, options)

    @property
    def checking(self) -> bool:
        return _CHECK_ONLY.get()

    @classmethod
    def listing(cls) -> str:
        """`model M; key $VAR` for `t2i-eval list`, from the defaults (cannot drift)."""
        defaults = {f.name: f.default for f in fields(cls)}
        key = defaults["api_key_env"]
        return f"model {defaults['model']}; " + (f"key ${key}" if key else "no key")

    def info(self) -> dict[str, Any]:
        """Names and `${VAR}` references only, never a credential."""
        return redact_options(
            {
                "provider": "openai",
                "model": self.model,
                "endpoint": self.endpoint,
                "api_key_env": self.api_key_env,
                "threshold": self.default,
                "thresholds": self.per_category,
                "taxonomy": TAXONOMY,
                "rule": "refuse when any category score > its threshold (the API's flagged is kept, not used)",
                "transport": transport_info(self),
                **self._info_extra(),
                **file_info(self.from_file),
            }
        )

    def _info_extra(self) -> dict[str, Any]:
        return {}

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/moderations"

    # -- requests ------------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        if not self.api_key_env:
            return {}
        return {"Authorization": f"Bearer {read_key(self.api_key_env, self.name)}"}

    def _secrets(self) -> list[str]:
        return env_secret(self.api_key_env) if self.api_key_env else []

    def _run(self, requests: list[list[Any]]) -> list[StageDecision]:
        """One request per group of inputs, `concurrency` at a time; decisions in input order."""
        if len(requests) <= 1:
            return [d for group in requests for d in self._request(group)]
        with ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
            return [d for decisions in pool.map(self._request, requests) for d in decisions]

    def _request(self, inputs: list[Any]) -> list[StageDecision]:
        """Decisions for the inputs of one request; never raises (an error is refused None)."""
        secrets = self._secrets()
        redact = Redactor(secrets)
        try:
            results, meta = self.client.request(
                "POST",
                self.endpoint,
                _parser(len(inputs)),
                body=json.dumps({"model": self.model, "input": inputs}).encode(),
                headers=JSON_HEADERS,
                auth=self._auth,
                secrets=secrets,
            )
        except _Unusable as e:
            if len(inputs) > 1:  # perhaps one input's fault: ask for each alone
                return [d for x in inputs for d in self._request([x])]
            return [self._error(str(e), {"error": str(e)}, redact)]
        except TransientError as e:
            message = f"{e.message} (gave up after {e.attempts} attempt(s))"
            raw = {"error": e.message, "attempts": e.attempts, "transient": True}
            return [self._error(message, raw, redact) for _ in inputs]
        except UserError as e:  # not sent: missing key, redirect, insecure URL
            return [self._error(str(e), {"error": str(e)}, redact) for _ in inputs]
        except Exception as e:  # a bug or an answer nobody foresaw: an error, never a refusal
            text = f"unexpected {type(e).__name__}: {e}"
            return [self._error(text, {"error": text, "unexpected": True}, redact) for _ in inputs]
        return [self._decision(r, meta, redact) for r in results]

    def _error(self, message: str, raw: dict[str, Any], redact: Redactor) -> StageDecision:
        raw = {"model": self.model, **raw}
        return StageDecision(
            self.stage, self.name, None, raw=redact.scrub(raw), message=redact(message)
        )

    def _decision(
        self, result: dict[str, Any], meta: dict[str, Any], redact: Redactor
    ) -> StageDecision:
        scores: dict[str, float] = result["category_scores"]
        d = decide(scores, self.per_category, self.default)
        overt: dict[str, float] = {}
        for c, s in scores.items():
            ours = self.overt.map(c) or "unmapped"
            overt[ours] = max(overt.get(ours, 0.0), s)
        triggered_overt = sorted({self.overt.map(c) or "unmapped" for c in d["triggered"]})
        raw = {
            "model": self.model,
            "scores": scores,
            "flagged": result.get("flagged"),
            "api_categories": sorted(
                c for c, on in (result.get("categories") or {}).items() if on is True
            ),
            "overt": overt,
            "triggered": d["triggered"],
            "triggered_overt": triggered_overt,
            **({"thresholds": d["limits"]} if self.per_category else {}),
            **meta,
        }
        message = ""
        if d["refused"]:
            message = "; ".join(
                f"{c} ({self.overt.map(c) or 'unmapped'}) {scores[c]:.3f} > {d['limits'][c]:g}"
                for c in d["triggered"]
            )
        return StageDecision(
            self.stage,
            self.name,
            d["refused"],
            score=d["score"],
            threshold=d["threshold"],
            raw=redact.scrub(raw),
            message=redact(message),
        )


def _parser(n: int) -> Callable[[Response], tuple[list[dict[str, Any]], dict[str, Any]]]:
    """`parse` for a request of `n` inputs: (n results with numeric scores, transport facts).
    A body of another shape is a broken answer (retried), a 4xx one with no scores `_Unusable`."""

    def parse(resp: Response) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if resp.status >= 400:
            err = error_fields(resp)
            message = resp.redact(str(err.get("message") or ""), 200) or resp.snippet()
            raise _Unusable(f"HTTP {resp.status}: {message}")
        body = resp.json()
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != n:
            got = len(results) if isinstance(results, list) else "no"
            raise TransientError(f"malformed body: {got} results for {n} input(s)")
        for r in results:
            scores = r.get("category_scores") if isinstance(r, dict) else None
            if (
                not isinstance(scores, dict)
                or not scores
                or not all(_finite(s) for s in scores.values())
            ):
                raise TransientError("malformed body: a result without numeric category_scores")
        return results, {"http_status": resp.status, "attempts": resp.attempt}

    return parse


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True, eq=False)
class ModerationPromptGuard(_Moderation):
    """OpenAI moderation of each prompt (text), `batch_size` prompts per request."""

    stage: ClassVar[StageKind] = "prompt_guard"

    batch_size: int = 32
    """Prompts per request (the endpoint takes a list of texts)."""

    def _check_values(self) -> None:
        super()._check_values()
        Options(self.name).integer("batch_size", self.batch_size, minimum=1)

    def _info_extra(self) -> dict[str, Any]:
        return {"input": "text", "batch_size": self.batch_size}

    def check(self, texts: list[str]) -> list[StageDecision]:
        texts = list(texts)
        step = self.batch_size
        return self._run([texts[i : i + step] for i in range(0, len(texts), step)])


@dataclass(kw_only=True, eq=False)
class ModerationImageGuard(_Moderation):
    """OpenAI moderation of each generated image, one image per request (a PNG data URL)."""

    stage: ClassVar[StageKind] = "image_guard"

    def _info_extra(self) -> dict[str, Any]:
        return {"input": "image (PNG data URL, one per request)"}

    def check(self, images: list[Any]) -> list[StageDecision]:
        return self._run([[image_part(im)] for im in images])


def image_part(image: Any) -> dict[str, Any]:
    """One image as the endpoint's input part: `{"type": "image_url", "image_url": {"url":
    "data:image/png;base64,..."}}` (PNG: lossless, so the API sees what the user would get)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}
