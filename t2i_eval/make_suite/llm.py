"""The `llm:MODEL` generator and judge: few-shot look-alikes from the policy and its seeds, an
unsafe twin for each, and ALLOWED/DISALLOWED labels, through the rewriter's chat backends (a
local transformers chat model, or any OpenAI-compatible endpoint with `--base-url`).

The words sent live in prompts/templates/llm.yaml. Every answer goes through the builder's
cache first (`cache.AnswerCache`): a request already answered is never sent again. An answer
that did not come (the endpoint's retries spent, a local model out of memory) is an `Outage`,
never a candidate or a label.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError, shorten
from ..net import TransientError
from ..paths import data_dir, load_yaml
from ..rewrite.rewriters import CHAT_BACKENDS, ChatBackend, RewriterSettings, validate
from .base import ALLOWED, DISALLOWED, Candidate, Outage
from .cache import AnswerCache, request_key
from .policy import CategoryPolicy

#: OVERT's near-duplicate threshold for LLM-converted prompts (its SemHash setting).
DEDUP_THRESHOLD = 0.9
ROLES = ("generate", "twin", "judge")
_BULLET = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022])\s*")
_VERDICT = re.compile(r"^\W*(disallowed|not allowed|allowed)\b", re.IGNORECASE)


def instructions_file() -> Path:
    """The shipped instructions (prompts/templates/llm.yaml)."""
    return data_dir("prompts") / "templates" / "llm.yaml"


def load_instructions(path: Path | None = None) -> tuple[dict[str, dict[str, str]], str]:
    """({role: {system, user}}, sha256 of the file) for the roles generate, twin and judge."""
    path = path or instructions_file()
    data = load_yaml(path, "llm instructions")
    where = f"llm instructions {path}"
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with {', '.join(ROLES)}")
    out: dict[str, dict[str, str]] = {}
    for role in ROLES:
        entry = data.get(role)
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("system", "user")
        ):
            raise UserError(f"{where}: '{role}' needs a 'system' and a 'user' text")
        out[role] = {"system": entry["system"], "user": entry["user"]}
    return out, hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fill(text: str, **values: Any) -> str:
    """Replace `{name}` placeholders; plain replacement, so braces in a policy's words are safe."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


class Chat:
    """A chat backend with the cache in front; an answer that did not come is an `Outage`."""

    def __init__(self, model: str, backend: ChatBackend, cache: AnswerCache) -> None:
        self.model, self.backend, self.cache = model, backend, cache
        # everything that changes an answer: the model, the endpoint, the token bound
        self.spec: dict[str, Any] = {"model": model, **getattr(backend, "spec", {})}

    def ask(self, system: str, user: str, what: str) -> str:
        key = request_key(self.spec, [system, user])
        hit = self.cache.get(key)
        if hit is not None:
            return str(hit)
        try:
            answer = self.backend.chat(system, user)
        except UserError:
            raise  # a 4xx, an endpoint that never answered: every request would meet it
        except Exception as e:  # retries spent, out of memory: not an answer
            why = e.message if isinstance(e, TransientError) else f"{type(e).__name__}: {e}"
            raise Outage(
                f"llm:{self.model} did not answer ({shorten(why, 200)}); answers so far are "
                "cached: rerun the same command to resume"
            ) from None
        self.cache.put(key, answer, what)
        return answer


def build_chat(
    ref: str, cache: AnswerCache, base_url: str | None, api_key_env: str | None, max_new_tokens: int
) -> Chat:
    """`llm:MODEL`: a local transformers chat model, or with `base_url` an OpenAI-compatible endpoint."""
    kind, _, model = ref.partition(":")
    if kind != "llm" or not model.strip():
        raise UserError(
            f"'{shorten(ref, 60)}': expected llm:MODEL (a model id, path or endpoint model name)"
        )
    backend = "http" if base_url else "transformers"
    settings = RewriterSettings(
        base_url=base_url, api_key_env=api_key_env, max_new_tokens=max_new_tokens
    )
    return Chat(model, CHAT_BACKENDS[backend](model, settings), cache)


def _policy_words(category: CategoryPolicy) -> dict[str, str]:
    return {
        "category": category.name.replace("_", " "),
        "disallowed": "; ".join(category.disallowed),
        "allowed": "; ".join(category.allowed),
    }


class LLMSource:
    """Look-alikes asked for in batches of `per_request`, at most `max_requests` per category.

    Each request names its batch number and rotates the seeds shown as examples, so no two
    requests are the same (answers are greedy: the same request would bring the same lines).
    A line that is empty or a refusal is no candidate; `unusable` counts them by category."""

    dedup_threshold = DEDUP_THRESHOLD

    def __init__(
        self,
        chat: Chat,
        per_request: int = 8,
        max_requests: int = 20,
        instructions: Path | None = None,
    ) -> None:
        self.chat, self.per_request, self.max_requests = chat, int(per_request), int(max_requests)
        self.words, sha = load_instructions(instructions)
        self.kind = f"llm:{chat.model}"
        self.spec: dict[str, Any] = {
            "kind": "llm",
            **chat.spec,
            "instructions_sha256": sha,
            "per_request": self.per_request,
            "max_requests": self.max_requests,
        }
        self.unusable: Counter[str] = Counter()
        self.twins = (
            "the model rewrites each kept look-alike into its unsafe twin (llm.yaml, role twin)"
        )

    def check(self, categories: list[str]) -> None:
        """Nothing to check offline: a model is only known by asking it."""

    def benign(self, category: CategoryPolicy) -> Iterator[list[Candidate]]:
        seeds = list(category.seeds) or ["(none given)"]
        role = self.words["generate"]
        for batch in range(1, self.max_requests + 1):
            shift = (batch - 1) % len(seeds)
            examples = "\n".join(f"- {s}" for s in seeds[shift:] + seeds[:shift])
            user = fill(
                role["user"],
                **_policy_words(category),
                examples=examples,
                n=self.per_request,
                batch=batch,
            )
            answer = self.chat.ask(role["system"], user, f"generate {category.name} batch {batch}")
            out = []
            for line in answer.splitlines():
                line = _BULLET.sub("", line)
                if not line.strip():
                    continue
                # checked as a rewrite of the request: prefixes and quotes go, refusals show
                status, text = validate(user, line)
                if status == "ok":
                    out.append(Candidate(text, category.name, "benign", None, {"batch": batch}))
                else:
                    self.unusable[f"{category.name}:benign:{status}"] += 1
            yield out

    def twin(self, category: CategoryPolicy, benign: Candidate) -> Candidate | None:
        role = self.words["twin"]
        user = fill(role["user"], **_policy_words(category), prompt=benign.text)
        answer = self.chat.ask(role["system"], user, f"twin {category.name}")
        status, text = validate(benign.text, answer)
        if status != "ok":
            self.unusable[f"{category.name}:unsafe:{status}"] += 1
            return None
        return Candidate(
            text, category.name, "unsafe", None, {**benign.origin, "twin_of": benign.text}
        )


def parse_verdict(answer: str) -> str | None:
    """ALLOWED, DISALLOWED, or None for an answer that says neither first."""
    m = _VERDICT.match(answer)
    if m is None:
        return None
    return ALLOWED if m.group(1).lower() == "allowed" else DISALLOWED


class LLMJudge:
    """Asks the model whether the policy allows each prompt (one request per prompt)."""

    def __init__(self, chat: Chat, instructions: Path | None = None) -> None:
        self.chat = chat
        words, sha = load_instructions(instructions)
        self.role = words["judge"]
        self.spec: dict[str, Any] = {
            "kind": "llm",
            **chat.spec,
            "instructions_sha256": sha,
            "rule": "the model answers ALLOWED or DISALLOWED; any other answer is unclear (dropped)",
        }

    def label(self, category: CategoryPolicy, texts: list[str]) -> list[str | None]:
        out = []
        for text in texts:
            user = fill(self.role["user"], **_policy_words(category), prompt=text)
            out.append(
                parse_verdict(self.chat.ask(self.role["system"], user, f"judge {category.name}"))
            )
        return out
