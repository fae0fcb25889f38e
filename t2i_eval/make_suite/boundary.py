"""Boundary sampling (optional): run the benign look-alikes through a target system and keep
those it refuses at least at rate R over N seeds, as OVERT kept prompts near its reference
model's refusal boundary.

Only hard refusals count (the item's status `refused`: a prompt guard, the generator or an
image guard said no); judges that read images afterwards (a blank image) do not run here. An
item that ends in an error is an `Outage`, never a rate. Each (system, prompt, seed) answer
is cached, so a rerun runs nothing twice.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..errors import UserError
from ..net import redact_options
from ..systems import build_system, parse_system, validate_spec
from ..systems.chain import BatchTooLarge, WorkItem
from ..types import content_id
from .base import Candidate, Outage
from .cache import AnswerCache, request_key

BIAS = (
    "Benign prompts were kept only if the target system {system} refused them on at least "
    "{rate:.0%} of {seeds} seed(s) (rejection sampling near its refusal boundary, as OVERT did). The suite "
    "is therefore biased against that system: its over-refusal on this suite is high by "
    "construction, and comparisons between it and other systems on this suite favour the others."
)


class Boundary:
    """Keeps look-alikes that `system` refuses on at least `keep_at_least` of `seeds` seeds."""

    def __init__(
        self, ref: str, keep_at_least: float, seeds: int, cache: AnswerCache, batch_size: int = 32
    ) -> None:
        if not 0.0 < keep_at_least <= 1.0:
            raise UserError(f"--keep-refused-at-least must be in (0, 1], got {keep_at_least}")
        if seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {seeds}")
        self.system_spec = parse_system(ref)
        validate_spec(self.system_spec)  # a typo fails now, before any model loads
        self.keep_at_least, self.seeds, self.cache = float(keep_at_least), int(seeds), cache
        self.batch_size = int(batch_size)
        self.system: Any = None
        self.spec: dict[str, Any] = {
            "system": self.system_spec.name,
            "system_spec": redact_options(self.system_spec.to_dict()),
            "system_digest": self.system_spec.digest,
            "seeds": self.seeds,
            "keep_refused_at_least": self.keep_at_least,
            "counts": "hard refusals only (status refused); an error item stops the build",
            "bias": BIAS.format(
                system=self.system_spec.name, rate=self.keep_at_least, seeds=self.seeds
            ),
        }

    def _key(self, text: str, seed: int) -> str:
        return request_key({"system": self.system_spec.digest}, [text, seed])

    def rates(self, texts: list[str]) -> list[float]:
        """Refused share of the seeds, per text."""
        todo = [
            WorkItem(content_id(t, str(s)), content_id(t), t, s)
            for t in dict.fromkeys(texts)
            for s in range(self.seeds)
            if self.cache.get(self._key(t, s)) is None
        ]
        self._run(todo)
        return [
            sum(self.cache.get(self._key(t, s)) == "refused" for s in range(self.seeds))
            / self.seeds
            for t in texts
        ]

    def _run(self, items: list[WorkItem]) -> None:
        if not items:
            return
        if self.system is None:
            self.system = build_system(self.system_spec)
        start, size = 0, self.batch_size
        while start < len(items):
            batch = items[start : start + size]
            try:
                results = self.system.run(batch)
            except BatchTooLarge:
                if size == 1:
                    raise
                size = max(1, size // 2)
                continue
            for r in results:
                if r.status == "error":
                    raise Outage(
                        f"target {self.system_spec.name} could not run '{r.item.text[:60]}' "
                        f"(seed {r.item.seed}): {r.error}; rerun the same command to resume"
                    )
                self.cache.put(self._key(r.item.text, r.item.seed), r.status, "target")
            start += len(batch)

    def keep(self, candidates: list[Candidate], counts: Counter[str]) -> list[Candidate]:
        """Candidates refused often enough; the others counted as `below_boundary`."""
        if not candidates:
            return []
        rates = self.rates([c.text for c in candidates])
        kept = [c for c, r in zip(candidates, rates, strict=True) if r >= self.keep_at_least]
        counts["below_boundary"] += len(candidates) - len(kept)
        return kept
