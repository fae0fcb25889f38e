"""The policy filter: a judge labels each candidate against the policy's words, and a candidate
whose label is not the intended one (a look-alike the policy disallows, a twin it allows) or
that the judge could not label is dropped and counted.

Judges (`--judge`): `llm:MODEL` (asks the model, `llm.LLMJudge`), `embed` (offline, below),
`guards[:A+B+...]` (offline, a vote of the shipped prompt guards, below), `none` (no filter;
the card says so).

Why the default offline judge is not the vote of the shipped guards: the guards are what
over-refuses. A look-alike exists to trip them, so a judge made of them drops exactly the prompts
the suite is for (the card of a `guards`-judged suite says so). The `embed` judge reads the policy
instead, with the guards' sentence model.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..errors import UserError
from ..systems.text_guards import MINILM, load_sentence_model
from .base import ALLOWED, DISALLOWED, EXPECTED, Candidate, Judge, Outage
from .policy import CategoryPolicy


class EmbedJudge:
    """Nearest policy phrase, offline: with MiniLM unit vectors, d = max cosine to the
    category's `disallowed` phrases and a = max cosine to its `allowed` phrases. DISALLOWED when
    d - a > margin, ALLOWED when a - d > margin, otherwise unclear (None, dropped)."""

    def __init__(self, margin: float = 0.0, model: str = MINILM) -> None:
        self.margin, self.encoder = float(margin), load_sentence_model(model)
        self._phrases: dict[str, tuple[Any, Any]] = {}  # category -> (disallowed, allowed) vectors
        self.spec: dict[str, Any] = {
            "kind": "embed",
            "model": model,
            "margin": self.margin,
            "rule": "d = max cos(prompt, disallowed phrases), a = max cos(prompt, allowed "
            f"phrases); disallowed when d - a > {self.margin}, allowed when a - d > "
            f"{self.margin}, else unclear (dropped)",
        }

    def scores(self, category: CategoryPolicy, texts: list[str]) -> list[tuple[float, float]]:
        """(d, a) per text, the numbers the rule compares."""
        import numpy as np

        def unit(items: list[str]) -> Any:
            return np.asarray(
                self.encoder.encode(items, normalize_embeddings=True), dtype=np.float32
            )

        if category.name not in self._phrases:
            self._phrases[category.name] = (
                unit(list(category.disallowed)),
                unit(list(category.allowed)),
            )
        d_vecs, a_vecs = self._phrases[category.name]
        vecs = unit(texts)
        return [
            (float(d), float(a))
            for d, a in zip((vecs @ d_vecs.T).max(1), (vecs @ a_vecs.T).max(1), strict=True)
        ]

    def label(self, category: CategoryPolicy, texts: list[str]) -> list[str | None]:
        if not texts:
            return []
        out: list[str | None] = []
        for d, a in self.scores(category, texts):
            out.append(
                DISALLOWED if d - a > self.margin else ALLOWED if a - d > self.margin else None
            )
        return out


#: The guards `--judge guards` votes with: the shipped offline ones.
SHIPPED_GUARDS = ("blocklist", "profanity", "concept")


class GuardsJudge:
    """A vote of the shipped prompt guards (offline; never reads the policy's words): DISALLOWED
    when at least `min_refusing` of them refuse the text, else ALLOWED. It biases the suite
    toward prompts those guards pass: a benign look-alike that trips most of them is dropped."""

    def __init__(self, names: tuple[str, ...] = SHIPPED_GUARDS) -> None:
        from ..systems import ComponentSpec, checked_class

        if not names or len(set(names)) != len(names):
            raise UserError("--judge guards:A+B+...: name each prompt guard once")
        self.names = names
        self.guards = [checked_class("prompt guard", ComponentSpec(n))() for n in names]
        self.min_refusing = len(names) // 2 + 1
        self.spec: dict[str, Any] = {
            "kind": "guards",
            "guards": list(names),
            "min_refusing": self.min_refusing,
            "rule": f"disallowed when at least {self.min_refusing} of {', '.join(names)} refuse "
            "at their shipped thresholds, else allowed; biased toward prompts these guards pass",
        }

    def label(self, category: CategoryPolicy, texts: list[str]) -> list[str | None]:
        if not texts:
            return []
        votes = [0] * len(texts)
        for guard in self.guards:
            for i, d in enumerate(guard.check(list(texts))):
                if d.refused is None:  # could not check: an outage, never a guessed label
                    raise Outage(f"judge guard {guard.name} could not check: {d.message}")
                votes[i] += bool(d.refused)
        return [DISALLOWED if v >= self.min_refusing else ALLOWED for v in votes]


class NoJudge:
    """No policy filter: every candidate keeps its intended label."""

    spec: dict[str, Any] = {"kind": "none", "rule": "no policy filter: every candidate kept"}

    def label(self, category: CategoryPolicy, texts: list[str]) -> list[str | None]:
        return [None] * len(texts)


def policy_filter(
    judge: Judge, category: CategoryPolicy, candidates: list[Candidate], counts: Counter[str]
) -> list[Candidate]:
    """The candidates whose judged label is their intended one; the others counted in
    `counts` as `judge_disagreed` or `judge_unclear`."""
    if isinstance(judge, NoJudge) or not candidates:
        return list(candidates)
    labels = judge.label(category, [c.text for c in candidates])
    kept = []
    for c, got in zip(candidates, labels, strict=True):
        if got is None:
            counts["judge_unclear"] += 1
        elif got != EXPECTED[c.label]:
            counts["judge_disagreed"] += 1
        else:
            kept.append(c)
    return kept
