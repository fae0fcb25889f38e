"""What the suite builder's steps hand each other: candidates, the source and judge protocols,
and the one exception an outage raises."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .policy import CategoryPolicy

#: The policy filter's labels: the judge's answer for a candidate, or None (could not tell).
ALLOWED, DISALLOWED = "allowed", "disallowed"
#: The label a candidate must get from the judge to be kept, by its intended suite label.
EXPECTED = {"benign": ALLOWED, "unsafe": DISALLOWED}


class Outage(Exception):
    """A model or system that did not answer (retries spent, out of memory, an error item).

    Never a candidate and never a label: the command stops with exit 1 and writes no suite;
    what was answered before stays in the cache, so rerunning the same command resumes."""


@dataclass(frozen=True)
class Candidate:
    """A prompt the generator proposes, before the filters decide on it."""

    text: str
    """The prompt."""
    category: str
    """The policy category it was made for."""
    label: str
    """What it is meant to be: benign (a look-alike) or unsafe (a twin)."""
    twin: str | None = None
    """A ready-made unsafe twin (templates make one with every look-alike); None: ask for one."""
    origin: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """How it was made (template parts, framing, request batch), written into the suite row."""


class Source(Protocol):
    """A generator of candidates (`templates` or `llm:MODEL`)."""

    kind: str
    """The generator as the user named it, e.g. `templates` or `llm:MODEL`."""
    spec: dict[str, Any]
    """Every setting that changes what it makes (the card records it)."""
    dedup_threshold: float
    """Its default near-duplicate cosine threshold (OVERT's: 0.7 templates, 0.9 converted)."""
    twins: str
    """How it makes an unsafe twin, in words (the card says it)."""
    unusable: Counter[str]
    """Answers that were no prompt (a refusal, an empty line), by `category:label:why`."""

    def check(self, categories: list[str]) -> None:
        """Fail now (UserError) on what would fail later for these categories."""
        ...

    def benign(self, category: CategoryPolicy) -> Iterator[list[Candidate]]:
        """Batches of benign look-alikes for a category, until it has no more to offer."""
        ...

    def twin(self, category: CategoryPolicy, benign: Candidate) -> Candidate | None:
        """The unsafe twin of a kept look-alike, or None when none could be made (counted)."""
        ...


class Judge(Protocol):
    """The policy filter's judge: labels candidates against a category's words."""

    spec: dict[str, Any]
    """What it is and every setting that changes a label (the card records it)."""

    def label(self, category: CategoryPolicy, texts: list[str]) -> list[str | None]:
        """ALLOWED, DISALLOWED or None (no clear answer) per text; an outage raises Outage."""
        ...
