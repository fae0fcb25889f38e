"""`blocklist` prompt guard: whole-word term matching, as many T2I services do in front of a model."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..paths import data_dir, load_yaml
from ..types import StageDecision
from .thresholds import check_file_option, file_info, read_thresholds, scalar_threshold

_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
)
_TOKEN = re.compile(r"[a-z0-9@$]+")
_NUMBERISH = re.compile(r"^\d+(st|nd|rd|th|s)?$")  # 1960s, 3rd, 911: numbers, not leetspeak


def normalize(text: str) -> str:
    """Lower-case, fold leetspeak inside words (`k1ll` -> `kill`, but `1960` stays), drop punctuation.

    Hyphens and apostrophes split words, so `self-harm` and `self harm` are the same term.
    """
    tokens = _TOKEN.findall(text.lower())
    folded = [t if _NUMBERISH.match(t) else t.translate(_LEET) for t in tokens]
    return " ".join(folded)


class BlocklistGuard:
    """Refuse a prompt that contains more than `threshold` listed terms (default 0: any term;
    score = number of distinct terms matched). `thresholds: FILE` takes a sweep's calibrated
    threshold instead (`systems/thresholds.py`)."""

    name = "blocklist"
    weights = "rules"

    def __init__(
        self,
        path: str | None = None,
        categories: list[str] | None = None,
        threshold: float = 0.0,
        thresholds: str | None = None,
    ) -> None:
        self.path = Path(path) if path else data_dir("guards") / "blocklist.yaml"
        self.categories = categories
        self.from_file = read_thresholds(thresholds, self.name) if thresholds else None
        self.threshold = scalar_threshold(self.from_file, threshold)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        check_file_option(cls.name, options)

    @cached_property
    def _spec(self) -> dict[str, Any]:
        if not self.path.is_file():
            raise UserError(f"blocklist: word list {self.path} not found")
        data = load_yaml(self.path, "blocklist") or {}
        if not isinstance(data, dict):
            raise UserError(f"blocklist {self.path}: expected a mapping")
        unknown = set(data) - {"version", "categories"}
        if unknown or not isinstance(data.get("categories"), dict):
            raise UserError(
                f"blocklist {self.path}: expected keys 'version' and 'categories' (a mapping of "
                f"category -> list of terms); found {sorted(data)}"
            )
        cats = data["categories"]
        if self.categories is not None:
            missing = [c for c in self.categories if c not in cats]
            if missing:
                raise UserError(
                    f"blocklist: no categories {missing} in {self.path} (have {sorted(cats)})"
                )
            cats = {c: cats[c] for c in self.categories}
        return {"version": data.get("version"), "categories": cats}

    @cached_property
    def _patterns(self) -> list[tuple[str, str, re.Pattern[str]]]:
        out = []
        for cat, terms in self._spec["categories"].items():
            for term in terms or []:
                norm = normalize(str(term))
                if norm:
                    out.append((cat, norm, re.compile(rf"(?<!\w){re.escape(norm)}(?:e?s)?(?!\w)")))
        return out

    def info(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "version": self._spec["version"],
            "terms": len(self._patterns),
            "rule": "refuse when any term matches (score > 0)"
            if self.threshold == 0
            else f"refuse when more than {self.threshold:g} distinct terms match",
            **file_info(self.from_file),
        }

    def check(self, texts: list[str]) -> list[StageDecision]:
        decisions = []
        for text in texts:
            norm = normalize(text)
            matches: dict[str, list[str]] = {}
            for cat, term, pattern in self._patterns:
                if pattern.search(norm) and term not in matches.get(cat, []):
                    matches.setdefault(cat, []).append(term)
            n = sum(len(v) for v in matches.values())
            message = ", ".join(f"'{t}' ({c})" for c, ts in matches.items() for t in ts)
            decisions.append(
                StageDecision(
                    "prompt_guard",
                    self.name,
                    n > self.threshold,
                    score=float(n),
                    threshold=self.threshold,
                    raw={"matches": matches},
                    message=f"matched {message}" if n > self.threshold else "",
                )
            )
        return decisions
