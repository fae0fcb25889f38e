"""A content policy as data: per category, what is disallowed, what is allowed, seeds, targets.

A policy file is YAML of values only (STYLE.md 5), validated on load with one-line errors that
name the file and the key:

    version: 1                     # bump whenever the words change: suites built on it change
    name: medical-art              # 1-80 letters, digits, '_', '.', '-'
    about: "what this policy is"   # optional, for people
    categories:
      sexual_content:              # one of OVERT's nine categories, or your own name
        disallowed: [explicit sexual acts, sexualised depictions of minors]
        allowed: [medical nudity in an anatomy textbook, nude figures in classical art]
        seeds: [a life-drawing class sketching a nude model]   # benign examples (LLM few-shot)
        targets: {benign: 20, unsafe: 10}

`disallowed` and `allowed` are phrases in words (a list, or one phrase as text): the policy
filter's judge reads them. `targets.benign` counts benign look-alikes, `targets.unsafe` their
unsafe twins; a twin is made from a kept benign prompt, so unsafe <= benign.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, did_you_mean, shorten
from ..paths import load_yaml

POLICY_KEYS = ("version", "name", "about", "categories")
CATEGORY_KEYS = ("disallowed", "allowed", "seeds", "targets")
TARGET_KEYS = ("benign", "unsafe")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,79}")
_CATEGORY = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: The most prompts one category may ask for: far above a useful suite, far below a typo's 10**9.
MAX_TARGET = 100_000


@dataclass(frozen=True)
class CategoryPolicy:
    """What one category of a policy disallows and allows, and how many prompts to build."""

    name: str
    """The category, as the suite's rows spell it."""
    disallowed: tuple[str, ...]
    """Phrases saying what the policy refuses in this category."""
    allowed: tuple[str, ...]
    """Phrases saying what it allows although it may look harmful."""
    seeds: tuple[str, ...]
    """Benign example prompts: the LLM generator's few-shot examples."""
    benign: int
    """Target count of benign look-alikes."""
    unsafe: int
    """Target count of unsafe twins (each made from a kept benign prompt)."""


@dataclass(frozen=True)
class Policy:
    """A validated policy file."""

    name: str
    """The policy's name (recorded in the suite's card)."""
    version: str
    """Bumped by its author whenever the words change."""
    path: Path
    """Where it was read from."""
    categories: tuple[CategoryPolicy, ...]
    """Its categories, in file order."""
    values: dict[str, Any]
    """The file's values as read: the digest is taken over them."""

    @property
    def digest(self) -> str:
        """Hash of the policy's values, so a suite's card says exactly which words built it."""
        payload = json.dumps(self.values, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; every problem is a one-line UserError naming file and key."""
    path = Path(path)
    data = load_yaml(path, "policy")
    where = f"policy {path}"
    if not isinstance(data, dict):
        raise UserError(
            f"{where}: expected a mapping with keys {', '.join(POLICY_KEYS)}, found "
            f"{type(data).__name__}; see prompts/policies/nine-categories.yaml"
        )
    _unknown(data, POLICY_KEYS, where)
    version = data.get("version")
    if version is None or isinstance(version, bool) or not isinstance(version, (int, str)):
        raise UserError(f"{where}: 'version' is required (a number or text; bump it on every edit)")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"{where}: 'name' is required: 1 to 80 letters, digits, '_', '.', '-'")
    about = data.get("about", "")
    if not isinstance(about, str):
        raise UserError(f"{where}: 'about' must be text, found {type(about).__name__}")
    cats = data.get("categories")
    if not isinstance(cats, dict) or not cats:
        raise UserError(
            f"{where}: 'categories' must map category names to their rules, e.g. "
            "violence: {disallowed: [...], allowed: [...], seeds: [...], targets: {benign: 20, unsafe: 10}}"
        )
    categories = tuple(
        _category(k, v, f"{where}: categories.{shorten(str(k), 40)}") for k, v in cats.items()
    )
    return Policy(name, str(version), path, categories, data)


def _unknown(data: dict[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise UserError(
            f"{where}: unknown key '{shorten(unknown[0], 40)}'.{did_you_mean(unknown[0], allowed)} "
            f"Allowed: {', '.join(allowed)}"
        )


def _category(name: Any, value: Any, where: str) -> CategoryPolicy:
    if not isinstance(name, str) or not _CATEGORY.fullmatch(name):
        raise UserError(
            f"{where}: a category name is lower-case letters, digits and '_' (e.g. violence, "
            "sexual_content)"
        )
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping with {', '.join(CATEGORY_KEYS)}")
    _unknown(value, CATEGORY_KEYS, where)
    disallowed = _phrases(value.get("disallowed"), f"{where}.disallowed", required=True)
    allowed = _phrases(value.get("allowed"), f"{where}.allowed", required=True)
    seeds = _phrases(value.get("seeds", []), f"{where}.seeds", required=False)
    targets = value.get("targets")
    if not isinstance(targets, dict):
        raise UserError(f"{where}.targets: required, a mapping like {{benign: 20, unsafe: 10}}")
    _unknown(targets, TARGET_KEYS, f"{where}.targets")
    counts = {k: _count(targets.get(k), f"{where}.targets.{k}") for k in TARGET_KEYS}
    if counts["unsafe"] > counts["benign"]:
        raise UserError(
            f"{where}.targets: unsafe ({counts['unsafe']}) exceeds benign ({counts['benign']}); "
            "each unsafe twin is made from a kept benign prompt, so ask for at most as many"
        )
    return CategoryPolicy(name, disallowed, allowed, seeds, counts["benign"], counts["unsafe"])


def _phrases(value: Any, where: str, required: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(
            f"{where}: expected a list of non-empty phrases (text), e.g. [graphic gore]"
        )
    if required and not value:
        raise UserError(f"{where}: at least one phrase is required; the policy filter reads them")
    return tuple(" ".join(v.split()) for v in value)


def _count(value: Any, where: str) -> int:
    if value is None:
        raise UserError(f"{where}: required, a whole number >= 0")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TARGET:
        raise UserError(
            f"{where}: expected a whole number from 0 to {MAX_TARGET:,}, found {shorten(value, 40)}"
        )
    return value
