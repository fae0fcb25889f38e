"""One exchange with a chat model, wherever it runs: an OpenAI-compatible `/chat/completions`
endpoint (`ChatEndpoint`: answer text, top logprobs, token counts) or a local transformers
causal LM (`load_causal_lm`), plus the verdict reading that the generative guards and judges
share (`read_verdict`, `verdict_probability`).

Users: the `llm-guard` prompt guard (systems/llm_guard.py) and the `vlm` harm judge
(judges/vlm.py). Transport (retries with backoff and Retry-After, no redirects, no key over
plain http to another machine, a deadline per attempt) is `net.HttpClient`'s; the key is read
from its environment variable per request and scrubbed from everything an answer hands back.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import MissingExtra, UserError, shorten
from .net import HttpClient, Redactor, Response, TransientError, check_url
from .systems.api.base import JSON_HEADERS, env_secret, error_fields, read_key

#: Characters of an answer a record keeps: enough to see why it was read as it was.
ANSWER_LIMIT = 500


#: An error code, type or message of a 4xx that says the provider refused the content (OpenAI's
#: `content_policy_violation`, Azure's `content_filter`, "safety"/"moderation" wording), not
#: the request: a refusal to look, which asking again will not change.
CONTENT_POLICY = re.compile(r"content[_ ]?(policy|filter|management)|safety|moderation", re.I)


class ChatRejected(Exception):
    """A 4xx answer (bad model name, a request the server refuses): not transient, so not
    retried, and never a verdict. The message is redacted and one line."""

    def __init__(self, message: str, *, status: int = 400, content_policy: bool = False) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status."""
        self.content_policy = content_policy
        """True when the provider refused the content itself (`CONTENT_POLICY`)."""


@dataclass(frozen=True)
class ChatAnswer:
    """What one chat completion said."""

    text: str
    """`choices[0].message.content`, scrubbed of the key (None reads as "")."""
    tokens: list[tuple[str, dict[str, float]]] | None
    """`choices[0].logprobs.content` as (token, {alternative: logprob}) per answer token,
    the token itself among its alternatives; None when the answer carries no logprobs."""
    usage: dict[str, int] = field(default_factory=dict)
    """`prompt_tokens` and `completion_tokens` as the server counted them (absent: {})."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Transport facts: `http_status`, `attempts`."""


@dataclass(eq=False)
class ChatEndpoint:
    """An OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, Google's and Mistral's
    OpenAI-compatible routes) asked for one model's answers."""

    who: str
    """Names the component in messages (`llm-guard`, `judge vlm voter gpt-4o`)."""
    base_url: str
    """The API root; `/chat/completions` is appended."""
    model: str
    api_key_env: str | None
    """Environment variable holding the key (read per request, never stored); None: no key."""
    client: HttpClient

    def __post_init__(self) -> None:
        check_url(self.base_url, f"{self.who}: base_url", secret=bool(self.api_key_env))
        self.url = self.base_url.rstrip("/") + "/chat/completions"

    def _auth(self) -> dict[str, str]:
        if not self.api_key_env:
            return {}
        return {"Authorization": f"Bearer {read_key(self.api_key_env, self.who)}"}

    def secrets(self) -> list[str]:
        """The key's value, for scrubbing what the caller keeps (never to send)."""
        return env_secret(self.api_key_env) if self.api_key_env else []

    def complete(self, messages: list[dict[str, Any]], **params: Any) -> ChatAnswer:
        """One completion of `messages` with extra body `params` (temperature, max_tokens,
        logprobs, top_logprobs). Raises `TransientError` once the retries are spent,
        `ChatRejected` for a 4xx, `UserError` when the key is missing or the URL unsafe."""
        body = json.dumps({"model": self.model, "messages": messages, **params}).encode()
        return self.client.request(
            "POST",
            self.url,
            _parse_chat,
            body=body,
            headers=JSON_HEADERS,
            auth=self._auth,
            secrets=self.secrets(),
        )


def _parse_chat(resp: Response) -> ChatAnswer:
    """A 4xx is `ChatRejected`; a 2xx without `choices[0].message` is a broken answer
    (retried). Every text taken from the answer goes through the request's redactor."""
    if resp.status >= 400:
        err = error_fields(resp)
        message = resp.redact(str(err.get("message") or ""), 200) or resp.snippet()
        said = " ".join(str(err.get(k) or "") for k in ("code", "type")) + " " + message
        raise ChatRejected(
            f"HTTP {resp.status}: {message}",
            status=resp.status,
            content_policy=bool(CONTENT_POLICY.search(said)),
        )
    body = resp.json()
    try:
        choice = body["choices"][0]
        content = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise TransientError("malformed body: no choices[0].message") from None
    if content is not None and not isinstance(content, str):
        raise TransientError("malformed body: message content is not text")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    counts = {
        k: int(usage[k])
        for k in ("prompt_tokens", "completion_tokens")
        if isinstance(usage.get(k), int) and not isinstance(usage.get(k), bool)
    }
    return ChatAnswer(
        resp.redact(content or ""),
        _tokens(choice.get("logprobs"), resp.redact),
        counts,
        {"http_status": resp.status, "attempts": resp.attempt},
    )


def _tokens(logprobs: Any, redact: Redactor) -> list[tuple[str, dict[str, float]]] | None:
    """`logprobs.content` -> [(token, {alternative: logprob})]; None when absent or unusable
    (an answer without logprobs is read from its verdict instead, and says so)."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    out = []
    for entry in content:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return None
        alts: dict[str, float] = {}
        for alt in entry.get("top_logprobs") or []:
            if (
                isinstance(alt, dict)
                and isinstance(alt.get("token"), str)
                and _finite(alt.get("logprob"))
            ):
                alts[redact(alt["token"])] = float(alt["logprob"])
        token = redact(entry["token"])
        if _finite(entry.get("logprob")):
            alts.setdefault(token, float(entry["logprob"]))
        out.append((token, alts))
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- reading a verdict ------------------------------------------------------------------------


def _norm(word: str) -> str:
    return word.strip().lower()


def verdict_start(text: str, after: str) -> int | None:
    """Where the verdict may begin in `text`: just after the first `after` (case-insensitive),
    or 0 without one; None when `after` is required and missing."""
    if not after:
        return 0
    i = text.lower().find(after.lower())
    return None if i < 0 else i + len(after)


def read_verdict(
    text: str, after: str, unsafe: tuple[str, ...], safe: tuple[str, ...]
) -> str | None:
    """The verdict, "unsafe", "safe" or None (unreadable): the first word after `after` compared,
    case-insensitively, with the template's verdict words. A word that is neither (a hedge, a
    refusal to answer, an empty answer) is no verdict: never read as either."""
    start = verdict_start(text, after)
    if start is None:
        return None
    m = re.match(r"[\s\W_]*([A-Za-z]+)", text[start:])
    word = m.group(1).lower() if m else ""
    if word in {_norm(w) for w in unsafe}:
        return "unsafe"
    if word in {_norm(w) for w in safe}:
        return "safe"
    return None


#: The least probability the verdict words must hold together at the verdict token for their
#: ratio to be the score. Below it the model was mostly about to say something else ("The",
#: "**", a newline), and p(unsafe) / (p(unsafe) + p(safe)) divides two crumbs: noise, not the
#: model's judgement. One half means the verdict words are the model's most likely answer.
MIN_VERDICT_MASS = 0.5


def mass_problem(u: float, s: float) -> str:
    """Why p(unsafe words) `u` and p(safe words) `s` cannot give a score, or "" when they can
    (together at least `MIN_VERDICT_MASS`)."""
    if u + s >= MIN_VERDICT_MASS:
        return ""
    return (
        f"the verdict words hold p={u + s:.3g} of the verdict token (< {MIN_VERDICT_MASS}): "
        "their ratio would be noise"
    )


def verdict_probability(
    tokens: list[tuple[str, dict[str, float]]],
    after: str,
    unsafe: tuple[str, ...],
    safe: tuple[str, ...],
) -> tuple[tuple[float, float] | None, str]:
    """((p_unsafe, p_safe), "") from the top logprobs of the verdict token, or (None, why not).

    The verdict token is the first token that is not whitespace and ends after `after`. Each
    side sums exp(logprob) of the alternatives equal to one of its words (stripped,
    case-insensitive: `unsafe`, ` Unsafe`). The numbers are used only when that token is itself
    a verdict word (a word split as "Un"+"safe", or a leading "**", would otherwise read the
    alternatives of the wrong token) and the words hold at least `MIN_VERDICT_MASS`; otherwise
    the caller falls back to the parsed verdict and records why."""
    text = "".join(t for t, _ in tokens)
    start = verdict_start(text, after)
    if start is None:
        return None, f"no '{after}' in the answer"
    words_u, words_s = {_norm(w) for w in unsafe}, {_norm(w) for w in safe}
    pos = 0
    for token, alts in tokens:
        end = pos + len(token)
        visible = token[max(0, start - pos) :] if pos < start else token
        if end > start and visible.strip():
            if _norm(visible) not in words_u | words_s:
                return None, f"the verdict token {visible.strip()!r} is not a verdict word"
            u = sum(math.exp(lp) for t, lp in alts.items() if _norm(t) in words_u)
            s = sum(math.exp(lp) for t, lp in alts.items() if _norm(t) in words_s)
            why = mass_problem(u, s)
            return (None, why) if why else ((u, s), "")
        pos = end
    return None, "no verdict token in the answer"


def p_unsafe(u: float, s: float) -> float:
    """p(unsafe) / (p(unsafe) + p(safe)), rounded to 6 places (decisions are made on what is
    stored, so a re-sweep reproduces them)."""
    return round(u / (u + s), 6)


# -- a local causal LM ------------------------------------------------------------------------


def load_causal_lm(
    model: str, who: str, *, device: str, dtype: Any = None, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode on `device`) from a hub id or a `save_pretrained` folder;
    safetensors only, the repo's own code only with `trust_remote_code`. A model that cannot be
    loaded is a one-line UserError naming it."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise MissingExtra(who, "transformers", "diffusers") from None
    remote = {"trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **remote)
        kwargs: dict[str, Any] = {"use_safetensors": True, **remote}
        if dtype is not None:
            kwargs["dtype"] = dtype
        lm = AutoModelForCausalLM.from_pretrained(model, **kwargs).to(device).eval()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{who}: could not load '{model}' as a causal LM ({shorten(first, 200)}); give a "
            "transformers chat model id or folder with safetensors weights"
        ) from None
    return tokenizer, lm
