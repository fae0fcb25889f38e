"""The `templates` generator: benign look-alikes and their unsafe twins from combinatorial
templates as data (subject x action x context x framing), offline and deterministic.

Files (values only): `<dir>/framings.yaml` holds the framing patterns and the twin patterns,
`<dir>/categories/<category>.yaml` one category's subjects, actions (each a benign variant and
its unsafe variant), contexts and the framings that fit it. How a twin is made: the same
subject and context with the action's unsafe variant, under one of the `twins` patterns instead
of the framing (see prompts/templates/framings.yaml).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError, did_you_mean, shorten
from ..paths import data_dir, load_yaml
from .base import Candidate
from .policy import CategoryPolicy

#: OVERT's near-duplicate threshold for template prompts (its SemHash setting).
DEDUP_THRESHOLD = 0.7
CATEGORY_FILE_KEYS = ("version", "category", "framings", "subjects", "actions", "contexts")
FRAMINGS_FILE_KEYS = ("version", "twins", "framings")


def default_dir() -> Path:
    """The shipped templates (prompts/templates)."""
    return data_dir("prompts") / "templates"


class TemplateSource:
    """Every (subject, action, context, framing pattern) of a category, in an order shuffled by
    `seed`: the same seed gives the same candidates in the same order."""

    kind = "templates"
    dedup_threshold = DEDUP_THRESHOLD

    def __init__(
        self, folder: str | Path | None = None, seed: int = 0, batch_size: int = 64
    ) -> None:
        self.folder = Path(folder) if folder else default_dir()
        self.seed, self.batch_size = int(seed), int(batch_size)
        path = self.folder / "framings.yaml"
        data = _mapping(load_yaml(path, "templates"), FRAMINGS_FILE_KEYS, f"templates {path}")
        self.twin_patterns = [
            _pattern(p, f"templates {path}: twins")
            for p in _list(data.get("twins"), f"templates {path}: twins")
        ]
        framings = data.get("framings")
        if not isinstance(framings, dict) or not framings:
            raise UserError(
                f"templates {path}: 'framings' must map a name to a list of patterns with {{scene}}"
            )
        self.framings = {
            str(k): [
                _pattern(p, f"templates {path}: framings.{k}")
                for p in _list(v, f"templates {path}: framings.{k}")
            ]
            for k, v in framings.items()
        }
        self.spec: dict[str, Any] = {
            "kind": self.kind,
            "folder": str(self.folder),
            "seed": self.seed,
            "framings_sha256": _sha(path),
        }
        self.unusable: Counter[str] = Counter()  # templates never make an unusable prompt
        self.twins = (
            "same subject and context, the action's unsafe variant, under one of the patterns "
            f"{json.dumps(self.twin_patterns)} (by a hash of the look-alike) instead of the framing"
        )

    def check(self, categories: list[str]) -> None:
        for category in categories:
            self.load(category)

    def _category_file(self, category: str) -> Path:
        path = self.folder / "categories" / f"{category}.yaml"
        if not path.is_file():
            have = sorted(p.stem for p in (self.folder / "categories").glob("*.yaml"))
            raise UserError(
                f"templates {self.folder}: no templates for category '{category}' (no {path.name})."
                f"{did_you_mean(category, have)} Have: {', '.join(have) or 'none'}; add "
                f"categories/{category}.yaml or use --generator llm:MODEL"
            )
        return path

    def load(self, category: str) -> dict[str, Any]:
        """One category's validated templates."""
        path = self._category_file(category)
        where = f"templates {path}"
        data = _mapping(load_yaml(path, "templates"), CATEGORY_FILE_KEYS, where)
        if data.get("category") != category:
            raise UserError(
                f"{where}: 'category' must be '{category}' (the file's name), found {shorten(data.get('category'), 40)}"
            )
        framings = _list(data.get("framings"), f"{where}: framings")
        unknown = [f for f in framings if f not in self.framings]
        if unknown:
            raise UserError(
                f"{where}: framing '{shorten(unknown[0], 40)}' is not in framings.yaml."
                f"{did_you_mean(unknown[0], list(self.framings))} Have: {', '.join(self.framings)}"
            )
        actions = data.get("actions")
        if (
            not isinstance(actions, list)
            or not actions
            or not all(
                isinstance(a, dict)
                and set(a) == {"benign", "unsafe"}
                and all(isinstance(x, str) and x.strip() for x in a.values())
                for a in actions
            )
        ):
            raise UserError(
                f"{where}: 'actions' must be a list of {{benign: ..., unsafe: ...}} texts"
            )
        return {
            "framings": framings,
            "subjects": _list(data.get("subjects"), f"{where}: subjects"),
            "actions": actions,
            "contexts": _list(data.get("contexts"), f"{where}: contexts"),
            "sha256": _sha(path),
        }

    def benign(self, category: CategoryPolicy) -> Iterator[list[Candidate]]:
        t = self.load(category.name)
        self.spec.setdefault("categories_sha256", {})[category.name] = t["sha256"]
        patterns = [(f, p) for f in t["framings"] for p in self.framings[f]]
        combos = list(itertools.product(t["subjects"], t["actions"], t["contexts"], patterns))
        # a seed per category: adding a category to the policy leaves the others' order alone
        rng = random.Random(f"{self.seed}\x1f{category.name}")
        rng.shuffle(combos)
        batch: list[Candidate] = []
        for subject, action, context, (framing, pattern) in combos:
            scene = f"{subject} {action['benign']} {context}"
            text = pattern.replace("{scene}", scene)
            twin_pattern = self.twin_patterns[
                int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(self.twin_patterns)
            ]
            twin = twin_pattern.replace("{scene}", f"{subject} {action['unsafe']} {context}")
            origin = {"framing": framing, "subject": subject, "context": context}
            batch.append(Candidate(text, category.name, "benign", twin, origin))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def twin(self, category: CategoryPolicy, benign: Candidate) -> Candidate | None:
        if benign.twin is None:
            return None
        return Candidate(
            benign.twin, category.name, "unsafe", None, {**benign.origin, "framing": "twin"}
        )


def _mapping(data: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with keys {', '.join(keys)}")
    unknown = sorted(str(k) for k in data if k not in keys)
    if unknown:
        raise UserError(
            f"{where}: unknown key '{shorten(unknown[0], 40)}'.{did_you_mean(unknown[0], keys)} Allowed: {', '.join(keys)}"
        )
    if data.get("version") is None:
        raise UserError(f"{where}: 'version' is required (bump it on every edit)")
    return data


def _list(value: Any, where: str) -> list[str]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise UserError(f"{where}: expected a non-empty list of texts")
    return [" ".join(v.split()) for v in value]


def _pattern(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.count("{scene}") != 1:
        raise UserError(
            f"{where}: expected a text holding {{scene}} once, e.g. 'a film still of {{scene}}'"
        )
    return value


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
