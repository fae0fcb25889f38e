"""The runtime of a system: run a batch of (prompt, seed) items through its stages.

Stages run in order (prompt guards -> generator -> image guards) and an item stops at the
first stage that refuses. An exception in a stage is an infrastructure error for the items it
touched, never a refusal; the batch is retried item by item so one bad item cannot sink others.

Fail-open or fail-closed: every guard (prompt or image) takes the option `on_error`, handled
here and not by the guard. When the guard raises or cannot check (`refused=None`):
- `error` (the default): the item is an error, excluded from rates and retried on resume;
- `pass`: the guard's decision becomes refused=False with `unavailable="pass: <reason>"`;
- `refuse`: it becomes refused=True with `unavailable="refuse: <reason>"`, and the record is
  refused by that guard (`refused_by` names it): a fail-closed system really refuses the user,
  so the record counts as refused with the guard's stage as cause.
Such decisions keep no score or threshold (the guard's own raw numbers, if any, move under
`raw["unavailable_raw"]`), so guard metrics and threshold sweeps, which read stored scores,
never count them as the guard's judgement; reports count them apart. Neither is retried on
resume: they are what the system as deployed did.

Every stage's wall time is measured per batch and divided evenly over the items it handled
(`StageDecision.seconds`), so a run says where its time went.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from ..types import StageDecision, StageKind

OnError = Literal["error", "pass", "refuse"]
#: What a guard's `on_error` may say; `error` is the default (see the module docstring).
ON_ERROR: tuple[str, ...] = ("error", "pass", "refuse")


class Component(Protocol):
    """What every stage component offers besides its stage method."""

    name: str
    #: "pretrained", "random" (random weights: numbers mean nothing), "fake", or "rules".
    weights: str

    def info(self) -> dict[str, Any]:
        """Facts for the manifest: model id/path, thresholds, versions."""
        ...


class PromptGuard(Component, Protocol):
    """What the chain needs of a prompt guard: `check(texts) -> decisions`."""
    def check(self, texts: list[str]) -> list[StageDecision]: ...


class Generator(Component, Protocol):
    """What the chain needs of a generator: `generate(items) -> results`."""
    def generate(self, texts: list[str], seeds: list[int]) -> list[GeneratorResult]: ...


class ImageGuard(Component, Protocol):
    """What the chain needs of an image guard: `check(images) -> decisions`."""
    def check(self, images: list[Any]) -> list[StageDecision]: ...


@dataclass
class GeneratorResult:
    """A generator's answer for one item: an image, or a refusal decision (APIs)."""

    decision: StageDecision
    image: Any = None


class BatchTooLarge(Exception):
    """A batch ran out of device memory; the runner retries it at half the size."""

    def __init__(self, size: int, cause: BaseException) -> None:
        super().__init__(f"batch of {size} ran out of memory: {cause}")
        self.size = size


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA or other devices) or an allocator's 'out of memory'."""
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


class GuardsOnly:
    """A generator that generates nothing: evaluate text guards on thousands of prompts fast.

    Items that pass every prompt guard end as status ok with no image ("accepted").
    """

    name = "guards-only"
    weights = "none"
    produces_images = False

    def info(self) -> dict[str, Any]:
        return {"rule": "stops after the prompt stage; no image is generated"}

    def generate(self, texts: list[str], seeds: list[int]) -> list[GeneratorResult]:
        raise RuntimeError("guards-only generates no images")


@dataclass(frozen=True)
class WorkItem:
    """One (prompt, seed) to run through a system: its record id, prompt id, text and seed."""
    record_id: str
    prompt_id: str
    text: str
    seed: int


@dataclass
class ItemResult:
    """What happened to one item; the runner turns it into a `Generation` record."""

    item: WorkItem
    status: str = "ok"
    refused_by: str | None = None
    decisions: list[StageDecision] = field(default_factory=list)
    image: Any = None
    delivered: str | None = None
    error: str | None = None
    seconds: float | None = None


class System:
    """Prompt guards -> generator -> image guards, stopping at the first refusal.

    `on_error` maps a guard's `stage:name` (as `refused_by` spells it, e.g.
    `prompt_guard:blocklist`) to its policy when it cannot check; unnamed guards use `error`.
    `clock` times the stages (injectable for deterministic tests)."""

    def __init__(
        self,
        name: str,
        generator: Generator,
        prompt_guards: list[PromptGuard] | None = None,
        image_guards: list[ImageGuard] | None = None,
        on_error: Mapping[str, OnError] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.generator = generator
        self.prompt_guards = list(prompt_guards or [])
        self.image_guards = list(image_guards or [])
        self.on_error = dict(on_error or {})
        self.clock = clock

    def components(self) -> list[tuple[str, Component]]:
        return [
            *(("prompt_guard", g) for g in self.prompt_guards),
            ("generator", self.generator),
            *(("image_guard", g) for g in self.image_guards),
        ]

    def run(self, items: list[WorkItem]) -> list[ItemResult]:
        """Run a batch; if it raises, run its items one by one to isolate the failure."""
        start = self.clock()
        try:
            results = self._run_batch(items)
        except Exception as e:
            if is_out_of_memory(e) and len(items) > 1:
                raise BatchTooLarge(len(items), e) from e  # the runner halves the batch
            if len(items) == 1:  # nothing to isolate: record it
                return [
                    ItemResult(
                        items[0],
                        status="error",
                        error=f"{type(e).__name__}: {e}",
                        seconds=self.clock() - start,
                    )
                ]
            return [self._run_one(it) for it in items]
        per_item = (self.clock() - start) / max(len(items), 1)
        for r in results:
            r.seconds = per_item
        return results

    def _run_one(self, item: WorkItem) -> ItemResult:
        start = self.clock()
        try:
            (result,) = self._run_batch([item])
        except Exception as e:  # infrastructure error: recorded, retried on resume
            result = ItemResult(item, status="error", error=f"{type(e).__name__}: {e}")
        result.seconds = self.clock() - start
        return result

    def _run_batch(self, items: list[WorkItem]) -> list[ItemResult]:
        results = [ItemResult(it) for it in items]
        active = list(range(len(items)))

        # Every prompt guard scores every prompt (text guards are cheap next to generation, and
        # per-guard metrics and sweeps on only the prompts earlier guards passed would be biased);
        # the first refusing guard still decides, and nothing refused is generated.
        for guard in self.prompt_guards:
            targets = list(range(len(items)))
            decisions = self._check(guard, "prompt_guard", [items[i].text for i in targets])
            _apply(results, targets, decisions, "prompt_guard")
            active = [i for i in active if results[i].status == "ok"]

        if active and not getattr(self.generator, "produces_images", True):
            for i in active:  # guards-only: what passed the prompt stage is "accepted"
                results[i].decisions.append(
                    StageDecision(
                        "generator",
                        self.generator.name,
                        False,
                        message="not generated (guards-only)",
                    )
                )
            active = []
        elif active:
            start = self.clock()
            outs = self.generator.generate(
                [items[i].text for i in active], [items[i].seed for i in active]
            )
            _check_len(self.generator, outs, active)
            per_item = _share(self.clock() - start, len(outs))
            still = []
            for i, out in zip(active, outs, strict=True):
                results[i].decisions.append(replace(out.decision, seconds=per_item))
                if out.decision.refused is None:
                    results[i].status = "error"
                    results[i].error = (
                        f"generator:{out.decision.name} could not check: "
                        f"{out.decision.message or 'no reason given'}"
                    )
                elif out.decision.refused:
                    results[i].status = "refused"
                    results[i].refused_by = f"generator:{out.decision.name}"
                elif out.image is None:
                    raise RuntimeError(f"generator '{self.generator.name}' returned no image")
                else:
                    results[i].image = out.image
                    still.append(i)
            active = still

        for guard in self.image_guards:
            if not active:
                break
            decisions = self._check(guard, "image_guard", [results[i].image for i in active])
            _apply(results, active, decisions, "image_guard")
            active = [i for i in active if results[i].status == "ok"]

        for r in results:
            if r.status == "ok":
                r.delivered = "image" if r.image is not None else None  # None: guards-only
            elif r.refused_by and r.refused_by.startswith("image_guard:"):
                r.delivered = "black"  # what diffusers' built-in checker hands the user
        return results

    def _check(self, guard: Component, stage: StageKind, inputs: list[Any]) -> list[StageDecision]:
        """The guard's decisions on `inputs`, timed, with its `on_error` policy applied to the
        ones it could not make."""
        policy = self.on_error.get(f"{stage}:{guard.name}", "error")
        start = self.clock()
        decisions = _guarded_check(guard, stage, inputs, policy)
        per_item = _share(self.clock() - start, len(decisions))
        return [_fallback(replace(d, seconds=per_item), policy) for d in decisions]


def _share(elapsed: float, n: int) -> float:
    """One item's even share of a batch's wall time (rounded to the microsecond)."""
    return round(elapsed / max(n, 1), 6)


def _guarded_check(
    guard: Any, stage: StageKind, inputs: list[Any], policy: str
) -> list[StageDecision]:
    """`guard.check(inputs)`; under `pass` or `refuse` an exception becomes "could not check"
    decisions instead of an error: a failing batch is checked again item by item (one bad
    input cannot sink the others), except out-of-memory, which still halves the batch."""
    if policy == "error":
        decisions = guard.check(inputs)
    else:
        try:
            decisions = guard.check(inputs)
        except Exception as e:
            if len(inputs) > 1:
                if is_out_of_memory(e):
                    raise
                return [d for x in inputs for d in _guarded_check(guard, stage, [x], policy)]
            reason = f"{type(e).__name__}: {e}"
            return [StageDecision(stage, guard.name, None, message=reason)]
    _check_len(guard, decisions, inputs)
    return decisions


def _fallback(d: StageDecision, policy: str) -> StageDecision:
    """A decision the guard could not make (refused=None), decided by its `on_error` policy;
    every other decision unchanged. Under `pass` / `refuse` it keeps no score or threshold
    (readers of stored scores must never take it for the guard's own judgement) and its raw
    numbers, if any, move under `unavailable_raw`."""
    if d.refused is not None or policy == "error":
        return d
    reason = d.message or "no reason given"
    return StageDecision(
        d.stage,
        d.name,
        policy == "refuse",
        raw={"unavailable_raw": d.raw} if d.raw else {},
        message=f"unavailable, on_error {policy}: {reason}",
        seconds=d.seconds,
        unavailable=f"{policy}: {reason}",
    )


def _check_len(component: Component, got: list, active: list[Any]) -> None:
    if len(got) != len(active):
        raise RuntimeError(f"{component.name} returned {len(got)} results for {len(active)} inputs")


def _apply(
    results: list[ItemResult], targets: list[int], decisions: list[StageDecision], stage: str
) -> None:
    """Record each decision; the first refusing stage becomes the item's cause.

    A stage that could not check (refused=None) is never read as a pass: the item becomes an
    error (excluded from rates, retried on resume) unless an earlier stage already refused it.
    A guard's `on_error` (`System._check`) has already turned such a decision into a pass or a
    refusal marked `unavailable` where it says so; a refusal of that kind refuses the item like
    any other (the deployed system refuses the user), with the guard in `refused_by`.
    """
    for i, d in zip(targets, decisions, strict=True):
        results[i].decisions.append(d)
        if results[i].status != "ok":
            continue
        if d.refused is None:
            results[i].status = "error"
            results[i].error = f"{stage}:{d.name} could not check: {d.message or 'no reason given'}"
        elif d.refused:
            results[i].status = "refused"
            results[i].refused_by = f"{stage}:{d.name}"
