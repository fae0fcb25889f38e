"""The runtime of a system: run a batch of (prompt, seed) items through its stages.

Stages run in order (prompt guards -> generator -> image guards) and an item stops at the
first stage that refuses. An exception in a stage is an infrastructure error for the items it
touched, never a refusal; the batch is retried item by item so one bad item cannot sink others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..types import StageDecision


class Component(Protocol):
    """What every stage component offers besides its stage method."""

    name: str
    #: "pretrained", "random" (random weights: numbers mean nothing), "fake", or "rules".
    weights: str

    def info(self) -> dict[str, Any]:
        """Facts for the manifest: model id/path, thresholds, versions."""
        ...


class PromptGuard(Component, Protocol):
    def check(self, texts: list[str]) -> list[StageDecision]: ...


class Generator(Component, Protocol):
    def generate(self, texts: list[str], seeds: list[int]) -> list[GeneratorResult]: ...


class ImageGuard(Component, Protocol):
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
    """Prompt guards -> generator -> image guards, stopping at the first refusal."""

    def __init__(
        self,
        name: str,
        generator: Generator,
        prompt_guards: list[PromptGuard] | None = None,
        image_guards: list[ImageGuard] | None = None,
    ) -> None:
        self.name = name
        self.generator = generator
        self.prompt_guards = list(prompt_guards or [])
        self.image_guards = list(image_guards or [])

    def components(self) -> list[tuple[str, Component]]:
        return [
            *(("prompt_guard", g) for g in self.prompt_guards),
            ("generator", self.generator),
            *(("image_guard", g) for g in self.image_guards),
        ]

    def run(self, items: list[WorkItem]) -> list[ItemResult]:
        """Run a batch; if it raises, run its items one by one to isolate the failure."""
        start = time.perf_counter()
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
                        seconds=time.perf_counter() - start,
                    )
                ]
            return [self._run_one(it) for it in items]
        per_item = (time.perf_counter() - start) / max(len(items), 1)
        for r in results:
            r.seconds = per_item
        return results

    def _run_one(self, item: WorkItem) -> ItemResult:
        start = time.perf_counter()
        try:
            (result,) = self._run_batch([item])
        except Exception as e:  # infrastructure error: recorded, retried on resume
            result = ItemResult(item, status="error", error=f"{type(e).__name__}: {e}")
        result.seconds = time.perf_counter() - start
        return result

    def _run_batch(self, items: list[WorkItem]) -> list[ItemResult]:
        results = [ItemResult(it) for it in items]
        active = list(range(len(items)))

        # Every prompt guard scores every prompt (text guards are cheap next to generation, and
        # per-guard metrics and sweeps on only the prompts earlier guards passed would be biased);
        # the first refusing guard still decides, and nothing refused is generated.
        for guard in self.prompt_guards:
            targets = list(range(len(items)))
            decisions = guard.check([items[i].text for i in targets])
            _check_len(guard, decisions, targets)
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
            outs = self.generator.generate(
                [items[i].text for i in active], [items[i].seed for i in active]
            )
            _check_len(self.generator, outs, active)
            still = []
            for i, out in zip(active, outs, strict=True):
                results[i].decisions.append(out.decision)
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
            decisions = guard.check([results[i].image for i in active])
            _check_len(guard, decisions, active)
            _apply(results, active, decisions, "image_guard")
            active = [i for i in active if results[i].status == "ok"]

        for r in results:
            if r.status == "ok":
                r.delivered = "image" if r.image is not None else None  # None: guards-only
            elif r.refused_by and r.refused_by.startswith("image_guard:"):
                r.delivered = "black"  # what diffusers' built-in checker hands the user
        return results


def _check_len(component: Component, got: list, active: list[int]) -> None:
    if len(got) != len(active):
        raise RuntimeError(f"{component.name} returned {len(got)} results for {len(active)} inputs")


def _apply(
    results: list[ItemResult], targets: list[int], decisions: list[StageDecision], stage: str
) -> None:
    """Record each decision; the first refusing stage becomes the item's cause.

    A stage that could not check (refused=None) is never read as a pass: the item becomes an
    error (excluded from rates, retried on resume) unless an earlier stage already refused it.
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
