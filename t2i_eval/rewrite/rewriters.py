"""Prompt rewriting as a mitigation: Suite -> Suite, every rewrite keeping its `parent_id`.

Rewriters:
- `rule`: replaces trigger words (from guards/rewrite_lexicon.yaml, and the run's leave-one-out
  triggers when present) with context-preserving alternatives; deterministic and offline.
- `llm`: a chat model rewrites the prompt (instructions in guards/rewrite_prompt.yaml), either a
  local transformers model (chat template, greedy, bounded new tokens) or any OpenAI-compatible
  endpoint (`--base-url`; the key is read from an environment variable and never written).

Every output is validated: empty, overlong, refusing ("I can't help with that") and unchanged
rewrites are recorded with that status and never used; an outage (an endpoint that keeps
failing, a guard re-check that could not check) is an `error`, retried on the next run.

`REWRITERS` maps each `--rewriter` kind to its builder; every builder returns a `Rewriter`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from ..errors import UserError, did_you_mean, shorten
from ..net import HttpClient, TransientError, check_url, redact_options, redact_url
from ..paths import data_dir
from ..store import append_jsonl, read_jsonl

STATUSES = ("ok", "empty", "overlong", "refusal", "unchanged", "error")
"""A rewrite's status: only `ok` rewrites are run; `error` ones are asked again on a rerun."""

RAW_LIMIT = 500
"""Characters of a rewriter's output kept in `Rewrite.details["raw"]`: enough to see why a
rewrite got its status, not a runaway generation in every record."""

Check = Callable[[list[str]], list[bool | None]]
"""The system's prompt guards re-checking texts: refused, not refused, or None (could not check)."""

_REFUSAL = re.compile(
    r"^\s*(i\s*(can(no|')t|cannot|won't|will not|am unable|'m unable|'m sorry|am sorry)|sorry\b|"
    r"as an ai\b|i apologi[sz]e|unfortunately,? i)",
    re.IGNORECASE,
)
_PREFIX = re.compile(r"^\s*(rewritten( image)? prompt|prompt|rewrite)\s*:\s*", re.IGNORECASE)


@dataclass
class Rewrite:
    """One prompt's rewrite and what became of it."""

    parent_id: str
    original: str
    text: str
    status: str
    rewriter: str
    details: dict[str, Any] = field(default_factory=dict)
    """`raw`: the rewriter's output before validation (cut to RAW_LIMIT), or `error`: why there
    is none; plus what the rewriter adds (the rule rewriter's replaced words)."""


@runtime_checkable
class Rewriter(Protocol):
    """What the rewrite experiment uses of a rewriter; every REWRITERS builder returns one."""

    key: str
    """Names its rewrites (`Rewrite.rewriter`), the linked suite's version and folder."""
    spec: dict[str, Any]
    """Every setting that changes a rewrite: keys the cache, is recorded in rewrite_plan.json
    and the linked run's manifest, and rebuilds the rewriter (`rewriter_from_spec`)."""

    def rewrite(self, parent_id: str, text: str) -> Rewrite:
        """One prompt's rewrite, with a status from STATUSES; never raises for an outage that
        a rerun may not meet again (that is an `error` rewrite)."""
        ...


@dataclass(frozen=True)
class RewriterSettings:
    """What `t2i-eval rewrite` hands every builder besides the ref's argument."""

    base_url: str | None = None
    """An OpenAI-compatible endpoint: the `llm` rewriter asks it instead of a local model."""
    api_key_env: str | None = None
    """The environment variable holding that endpoint's key (read per request, never written)."""
    max_new_tokens: int = 96
    """The most tokens an `llm` answer may have."""
    triggers: dict[str, list[str]] | None = None
    """Prompt text -> the run's leave-one-out trigger words (the rule rewriter reports those it
    has no alternative for)."""
    check: Check | None = None
    """The system's prompt guards, for the rule rewriter to re-check its alternatives."""


def validate(original: str, raw: str | None, max_ratio: float = 3.0) -> tuple[str, str]:
    """(status, cleaned text): strip quotes and 'Rewritten prompt:' prefixes, then classify."""
    text = (raw or "").strip().splitlines()[0].strip() if (raw or "").strip() else ""
    text = _PREFIX.sub("", text).strip().strip('"').strip("'").strip()
    if not text:
        return "empty", text
    if _REFUSAL.match(text):
        return "refusal", text
    if len(text.split()) > max_ratio * len(original.split()) + 20:
        return "overlong", text
    if " ".join(text.lower().split()) == " ".join(original.lower().split()):
        return "unchanged", text
    return "ok", text


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


class RuleRewriter:
    """Replace listed trigger words with their first context-preserving alternative."""

    def __init__(
        self,
        lexicon: str | None = None,
        triggers: dict[str, list[str]] | None = None,
        check: Check | None = None,
    ) -> None:
        """`check(texts) -> refused?` re-checks the system's prompt guards: when the first
        alternatives still get refused, the second and third are tried in turn. A re-check
        that could not check (None) makes the rewrite an `error`: which alternative passes
        is then unknown, and the next run asks again."""
        self.check = check
        self.path = Path(lexicon) if lexicon else data_dir("guards") / "rewrite_lexicon.yaml"
        if not self.path.is_file():
            raise UserError(f"rule rewriter: lexicon {self.path} not found")
        try:
            data = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise UserError(f"rule rewriter: {self.path}: malformed YAML") from None
        terms = data.get("terms") if isinstance(data, dict) else None
        if isinstance(terms, dict):
            bad = [
                k
                for k, v in terms.items()
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v)
            ]
            if bad:
                raise UserError(
                    f"rule rewriter: {self.path}: terms {bad[:3]} need a list of "
                    "alternatives, e.g. kill: [defeat]"
                )
        if not isinstance(terms, dict) or not terms:
            raise UserError(
                f"rule rewriter: {self.path} needs a 'terms' mapping of word -> [alternatives]"
            )
        self.version = data.get("version")
        self.terms = {str(k).lower(): [str(x) for x in v] for k, v in terms.items() if v}
        # one pass over the text with every term, longest first ('drunk driving' before
        # 'driving'), so a replacement is never itself rewritten again
        alternation = "|".join(re.escape(t) for t in sorted(self.terms, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<![\w-])({alternation})(?:e?s)?(?![\w-])", re.IGNORECASE)
        self.triggers = triggers or {}
        self.key = f"rule@{self.version}"
        self.spec = {
            "kind": "rule",
            # where it is, to rebuild from the spec: None is the shipped one (wherever installed)
            "lexicon": str(self.path.resolve()) if lexicon else None,
            "version": self.version,
            "rechecks_guards": check is not None,
            "lexicon_sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
            # the records list the triggers without an alternative: new triggers, new records
            "triggers_digest": _digest(self.triggers) if self.triggers else None,
        }

    def _covered(self, word: str) -> bool:
        """A trigger the lexicon replaces, plural forms included (the matcher takes s/es)."""
        return any(w in self.terms for w in (word, word.removesuffix("s"), word.removesuffix("es")))

    def rewrite(self, parent_id: str, text: str) -> Rewrite:
        replaced: list[str] = []

        def with_alternative(k: int) -> str:
            def swap(m: re.Match[str]) -> str:
                term = m.group(1).lower()
                if k == 0:
                    replaced.append(term)
                alts = self.terms[term]
                return alts[min(k, len(alts) - 1)]

            return self._pattern.sub(swap, text)

        out = with_alternative(0)
        recheck = None
        if self.check is not None and replaced:
            for k in range(max(len(self.terms[t]) for t in replaced)):
                candidate = out if k == 0 else with_alternative(k)
                try:
                    still = self.check([candidate])[0]
                    failure = ""
                except UserError:
                    raise
                except Exception as e:  # a guard that failed could not check either
                    still, failure = None, f" ({type(e).__name__}: {e})"
                recheck = {"alternative": k, "still_refused": still}
                if still is None:
                    why = f"a prompt guard could not re-check alternative {k}{failure}"
                    details = {"error": why, "replaced": replaced, "recheck": recheck}
                    return Rewrite(parent_id, text, "", "error", self.key, details)
                if not still:
                    out = candidate
                    break
        missing = [t for t in self.triggers.get(text, []) if not self._covered(t.lower())]
        status, cleaned = validate(text, out)
        return Rewrite(
            parent_id,
            text,
            cleaned,
            status,
            self.key,
            {
                "raw": out[:RAW_LIMIT],
                "replaced": replaced,
                "triggers_without_alternative": missing,
                "recheck": recheck,
            },
        )


class ChatBackend:
    """Something that answers one chat exchange."""

    def chat(self, system: str, user: str) -> str: ...


class TransformersChat(ChatBackend):
    """A local causal LM: chat template, greedy decoding, at most `max_new_tokens` new tokens."""

    def __init__(self, model: str, max_new_tokens: int = 96, device: str = "cpu") -> None:
        from ..chat import load_causal_lm

        self.tokenizer, self.model = load_causal_lm(model, "llm rewriter", device=device)
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(
                f"llm rewriter: '{model}' has no chat template; use an instruction-tuned chat model"
            )
        import torch

        self._torch, self.device, self.max_new_tokens = torch, device, int(max_new_tokens)
        self.spec = {"max_new_tokens": self.max_new_tokens}

    def chat(self, system: str, user: str) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = {k: v.to(self.device) for k, v in ids.items()}
        with self._torch.inference_mode():
            out = self.model.generate(
                **ids,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True)


class OpenAIChat(ChatBackend):
    """Any OpenAI-compatible /chat/completions endpoint (vLLM, Ollama, hosted APIs), through
    the package's one chat client (`chat.ChatEndpoint`: `net.HttpClient`'s retries, no
    redirects, no key over plain http to another machine, the key read per request from
    `api_key_env` and scrubbed from the answer). An endpoint that never answers aborts the run
    instead of being retried prompt after prompt.
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str | None = None,
        max_new_tokens: int = 96,
        timeout: float = 60.0,
        max_attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        from ..chat import ChatEndpoint

        check_url(base_url, "--base-url", secret=bool(api_key_env))
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        # written to rewrite_plan.json and the linked run's manifest: no user info or key
        self.spec = {"base_url": redact_options(base_url), "max_new_tokens": self.max_new_tokens}
        self.client = HttpClient(
            "llm rewriter",
            timeout=timeout,
            max_attempts=max_attempts,
            backoff=backoff,
            max_backoff=max_backoff,
            sleep=time.sleep,
        )
        self.endpoint = ChatEndpoint("llm rewriter", base_url, model, api_key_env, self.client)
        self.url = self.endpoint.url

    @property
    def attempts(self) -> int:
        """Total HTTP attempts, for reports and tests."""
        return self.client.attempts

    def chat(self, system: str, user: str) -> str:
        from ..chat import ChatRejected

        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            answer = self.endpoint.complete(
                messages, temperature=0, max_tokens=self.max_new_tokens
            )
        except ChatRejected as e:
            raise UserError(f"llm rewriter: {redact_url(self.url)} answered {e}") from None
        except TransientError as e:
            if not self.client.answered:
                raise UserError(
                    f"llm rewriter: {redact_url(self.url)} never answered ({e.message}); is the "
                    "server running?"
                ) from None
            raise
        return answer.text


class LLMRewriter:
    """A chat model asked to rewrite each prompt (instructions from guards/rewrite_prompt.yaml).

    An answer that did not come (the backend's `TransientError` after its retries, a local
    model out of memory) is an `error` rewrite, as a failing stage is an error item in
    `systems.chain`; a `UserError` (bad configuration) aborts the rewrite. What did come is
    validated and kept, cut to RAW_LIMIT, in `raw`.
    """

    def __init__(
        self, backend: ChatBackend, model: str, kind: str, instructions: str | None = None
    ) -> None:
        path = Path(instructions) if instructions else data_dir("guards") / "rewrite_prompt.yaml"
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if "system" not in data or "{prompt}" not in str(data.get("user", "")):
            raise UserError(f"llm rewriter: {path} needs 'system' and a 'user' with {{prompt}}")
        self.system, self.user = str(data["system"]), str(data["user"])
        self.backend = backend
        self.spec = {  # everything that changes an answer keys the cache
            "kind": f"llm-{kind}",
            "model": model,
            "instructions_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            **getattr(backend, "spec", {}),
        }
        self.key = f"llm:{model}"

    def rewrite(self, parent_id: str, text: str) -> Rewrite:
        try:
            raw = self.backend.chat(self.system, self.user.replace("{prompt}", text))
        except UserError:
            raise  # a 4xx, an endpoint that never answered: every prompt would meet it
        except Exception as e:  # an outage (retries spent, out of memory): asked again next run
            why = str(e.args[0]) if isinstance(e, TransientError) else f"{type(e).__name__}: {e}"
            return Rewrite(parent_id, text, "", "error", self.key, {"error": why})
        status, cleaned = validate(text, raw)
        return Rewrite(parent_id, text, cleaned, status, self.key, {"raw": raw[:RAW_LIMIT]})


def _rule(arg: str, settings: RewriterSettings) -> Rewriter:
    """`rule` (the shipped lexicon) or `rule:LEXICON.yaml`."""
    return RuleRewriter(arg or None, triggers=settings.triggers, check=settings.check)


def _llm(arg: str, settings: RewriterSettings) -> Rewriter:
    """`llm:MODEL`: a local transformers model, or with `base_url` an OpenAI-compatible
    endpoint (the backend's name goes into the spec's kind: `llm-http`, `llm-transformers`)."""
    if not arg:
        raise UserError("--rewriter llm:MODEL needs a model id or path")
    backend = "http" if settings.base_url else "transformers"
    return LLMRewriter(CHAT_BACKENDS[backend](arg, settings), arg, backend)


#: Chat backend of the `llm` rewriter -> how it is built from the model and the settings.
CHAT_BACKENDS: dict[str, Callable[[str, RewriterSettings], ChatBackend]] = {
    "transformers": lambda model, s: TransformersChat(model, s.max_new_tokens),
    "http": lambda model, s: OpenAIChat(model, s.base_url or "", s.api_key_env, s.max_new_tokens),
}

#: `--rewriter KIND[:ARG]` -> its builder, called with ARG and the settings. A new rewriter is
#: one entry here (and one offline variant in tests/test_contracts_rewriters.py).
REWRITERS: dict[str, Callable[[str, RewriterSettings], Rewriter]] = {"rule": _rule, "llm": _llm}


def build_rewriter(
    ref: str,
    *,
    base_url: str | None = None,
    api_key_env: str | None = None,
    max_new_tokens: int = 96,
    triggers: dict[str, list[str]] | None = None,
    check: Check | None = None,
) -> Rewriter:
    """`rule`, `rule:LEXICON.yaml`, or `llm:MODEL` (a local transformers model, or with
    `base_url` an OpenAI-compatible endpoint): the REWRITERS entry the ref's kind names."""
    kind, _, arg = ref.partition(":")
    builder = REWRITERS.get(kind)
    if builder is None:
        raise UserError(
            f"Unknown rewriter '{kind}'.{did_you_mean(kind, list(REWRITERS))} Available: "
            f"{', '.join(REWRITERS)} (--rewriter rule, rule:LEXICON.yaml or llm:MODEL)"
        )
    settings = RewriterSettings(base_url, api_key_env, max_new_tokens, triggers, check)
    return builder(arg, settings)


def rewriter_from_spec(
    spec: dict[str, Any],
    *,
    api_key_env: str | None = None,
    triggers: dict[str, list[str]] | None = None,
    check: Check | None = None,
) -> Rewriter:
    """The rewriter a recorded spec describes (rewrite_plan.json, the linked run's manifest),
    built again with the same key and spec, so it finds the same cached rewrites.

    What the spec does not hold is passed again: the variable holding the API key (a name from
    the user's environment), the run's trigger words and the guards' re-check (a callable; the
    spec records only whether there was one). A base URL recorded with its credentials
    redacted is rebuilt redacted: pass the real one to `build_rewriter` instead.
    """
    kind = str(spec.get("kind", ""))
    name, _, backend = kind.partition("-")
    if name == "rule" and not backend:
        ref = f"rule:{spec['lexicon']}" if spec.get("lexicon") else "rule"
    elif name == "llm" and backend in CHAT_BACKENDS and spec.get("model"):
        ref = f"llm:{spec['model']}"
    else:
        known = ["rule", *(f"llm-{b}" for b in CHAT_BACKENDS)]
        raise UserError(
            f"rewriter spec: kind '{shorten(kind)}' is no rewriter of this t2i-eval version "
            f"(expected one of {', '.join(known)}, with a 'model' for llm); rewrite again"
        )
    return build_rewriter(
        ref,
        base_url=spec.get("base_url") if backend == "http" else None,
        api_key_env=api_key_env,
        max_new_tokens=int(spec.get("max_new_tokens", 96)),
        triggers=triggers,
        check=check,
    )


class RewriteCache:
    """Rewrites keyed by (prompt text, rewriter spec), appended to a JSONL file: rerunning a
    rewrite (or resuming one) never asks a model twice."""

    def __init__(self, path: Path, spec: dict[str, Any]) -> None:
        self.path, self.spec_digest = path, _digest(spec)
        self.cache: dict[str, Rewrite] = {}
        # the run store's JSONL: a torn last line (a crash mid-write) is dropped when read and
        # cut off before the next append, so it never swallows the record written after it
        for d in read_jsonl(path) if path.exists() else ():
            try:
                key = d.pop("key")  # before Rewrite(**d): it takes no 'key'
                self.cache[key] = Rewrite(**d)
            except (KeyError, TypeError):
                raise UserError(
                    f"{path}: a record that is no rewrite of this t2i-eval version ({sorted(d)}); "
                    "delete the file to rewrite again"
                ) from None

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.spec_digest}\x1f{text}".encode()).hexdigest()[:20]

    def get_or_make(self, parent_id: str, text: str, make: Callable[[], Rewrite]) -> Rewrite:
        k = self.key(text)
        hit = self.cache.get(k)
        if hit is not None and hit.status != "error":  # errors are retried
            return Rewrite(parent_id, hit.original, hit.text, hit.status, hit.rewriter, hit.details)
        rw = make()
        self.cache[k] = rw
        append_jsonl(self.path, [{"key": k, **asdict(rw)}])
        return rw
