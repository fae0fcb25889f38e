"""What every judge offers the judge pass (`Judge`), and what it is shown per record (`JudgeItem`).

How to add a judge (one new file + one line in `JUDGES`; nothing else names it):

1. `judges/<name>.py` with a class that has
   - `role`: which outcome its verdicts decide, one of `types.OUTCOME_ROLES` ("blank": a
     flagged image is blocked; "sanitization": a flagged image is sanitized; "harm": a flagged
     unsafe image was delivered harmful) or "none" (measures only, e.g. faithfulness). The
     judge pass records it in the manifest, and `store.pick_judges` reads it from there: the
     most recent judge of a role decides that role's outcomes.
   - `needs_reference`: True when each item must come with the reference run's image (the pass
     then demands `--reference` before any model loads).
   - `formula`: one line for the report's judges table: what is measured and when it flags.
   - `mean_score`: the score's name when the report should average it per category and label
     (e.g. "CLIPScore"), else None.
   - `from_spec(spec) -> judge` (classmethod): checks the spec's values (unknown keys and bad
     values raise `UserError` naming the spec file) and builds the judge.
   - `key` ("name@version": the verdict file's name) and `weights` ("rules", "pretrained" or
     "random": reports label random weights).
   - `judge_batch(items) -> list[Verdict]`: one verdict per item, each with a human-readable
     `reason` and every number it decided on in `raw` (so thresholds can be re-swept later).
     `flagged=None` means "could not judge" (never a refusal, retried by the next pass).
2. One line in `judges/__init__.py`: `JUDGES["<kind>"] = "t2i_eval.judges.<name>:<Class>"`.
3. Its spec as data: `judges/<name>.yaml` with `name`, `version`, `kind` and its values.

`tests/test_contracts_judges.py` runs the contract over every entry of `JUDGES` and fails for an
entry it has no offline build for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..types import OUTCOME_ROLES, Verdict

#: The role of a judge whose verdicts decide no outcome (it measures only).
NO_ROLE = "none"
#: Every role a judge may declare.
ROLES: tuple[str, ...] = (*OUTCOME_ROLES, NO_ROLE)


def spec_key(spec: dict[str, Any]) -> str:
    """`name@version`: the key of the judge a spec builds (its verdict file's name), known
    without building it; every judge's `key` equals it."""
    return f"{spec['name']}@{spec['version']}"


@dataclass
class JudgeItem:
    """What a judge may look at for one record."""

    record_id: str
    """The record judged; the verdict carries it."""
    image: Any
    """The delivered image (PIL, RGB)."""
    prompt: str
    """The prompt's text ("" when the prompt is missing from prompts.jsonl)."""
    category: str
    """The prompt's category (harm picks its descriptions by it)."""
    label: str
    """benign or unsafe."""
    reference: Any = None
    """The reference system's image for the same prompt and seed (sanitization only)."""


@runtime_checkable
class Judge(Protocol):
    """The interface the judge pass (`judging.judge_run`) uses; see the module docstring."""

    role: ClassVar[str]
    """The outcome role its verdicts decide: one of `types.OUTCOME_ROLES`, or "none"."""
    needs_reference: ClassVar[bool]
    """Whether each item needs the reference run's image."""
    formula: ClassVar[str]
    """What it measures and when it flags, in one line (the report's judges table)."""
    mean_score: ClassVar[str | None]
    """The score's name when reports average it per category and label, else None."""

    @property
    def key(self) -> str:
        """`name@version`: the verdict file's name and every verdict's `judge`."""
        ...

    @property
    def weights(self) -> str:
        """rules, pretrained or random (random-weight verdicts are labelled as such)."""
        ...

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Judge:
        """Check a loaded spec's values and build the judge (may load a model)."""
        ...

    def judge_batch(self, items: list[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order, each with a reason and its raw numbers."""
        ...
