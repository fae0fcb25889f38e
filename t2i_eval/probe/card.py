"""A trained probe's card (`DIR/guard.json`): read and checked, the training-overlap count, and
the lines a report shows about a guard trained here.

Light on purpose (no numpy, no torch): `report` and the explorer import it to name a trained
guard and to flag a suite that shares prompts with its training data. The card stores hashes of
the training texts, not the texts: a card can be shared without shipping a dataset's prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError, shorten
from ..suite_spec import fold_text
from ..types import Prompt

CARD = "guard.json"
HEAD = "head.safetensors"
KIND = "t2i-eval probe"
CARD_VERSION = 1
#: Keys every card has; a card missing one was not written by `train-guard` (or was cut short).
REQUIRED = (
    "kind",
    "card_version",
    "encoder",
    "head",
    "train",
    "seed",
    "threshold",
    "train_text_sha256",
)
#: guard.json is small (hashes of training texts: ~19 bytes each); a wrong, huge file stops here.
MAX_BYTES = 64 * 2**20


def text_key(text: str) -> str:
    """The overlap key of a prompt: sha256 of its NFKC-folded, lower-cased, whitespace-collapsed
    text (first 16 hex digits), so `A  Knife` and `a knife` count as the same prompt."""
    norm = re.sub(r"\s+", " ", fold_text(text)).strip()
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()[:16]


def read_card(folder: str | Path) -> dict[str, Any]:
    """The checked card of a probe folder; a missing, unreadable or foreign file is a UserError."""
    path = Path(folder) / CARD
    fix = "train one with: t2i-eval train-guard --train SUITE --out DIR"
    if not Path(folder).is_dir():
        raise UserError(f"probe guard: {shorten(str(folder))} is not a folder; {fix}")
    if not path.is_file():
        raise UserError(f"probe guard: {path} not found (expected a trained probe folder); {fix}")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"probe guard: {path} is over {MAX_BYTES >> 20} MiB; not a probe card")
    try:
        card = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"probe guard: {path} is not JSON ({e}); {fix}") from None
    missing = [k for k in REQUIRED if k not in card] if isinstance(card, dict) else list(REQUIRED)
    if missing or card.get("kind") != KIND:
        raise UserError(
            f"probe guard: {path} is not a probe card (missing {', '.join(missing) or 'none'}, "
            f"kind {shorten(card.get('kind') if isinstance(card, dict) else card)!r}, expected "
            f"{KIND!r}); {fix}"
        )
    if card["card_version"] != CARD_VERSION:
        raise UserError(
            f"probe guard: {path} has card_version {shorten(card['card_version'])}, this t2i-eval "
            f"reads {CARD_VERSION}; retrain with this version's train-guard"
        )
    _check_fields(card, path)
    return card


def _check_fields(card: dict[str, Any], path: Path) -> None:
    """The entries the guard loads from, checked without torch: when a run's options are
    checked, a hand-edited or mixed-up card is one line before anything loads or is written."""
    from .heads import HEADS, HIDDEN, expected_shapes

    def bad(entry: str, expected: str, found: Any) -> UserError:
        shown = shorten(repr(found)) if isinstance(found, str) else shorten(found)
        return UserError(
            f"probe guard: {path}: {entry} must be {expected}, found {shown}; the card was "
            "edited or cut short: retrain with t2i-eval train-guard"
        )

    enc, head, thr = card["encoder"], card["head"], card["threshold"]
    for entry, value in (("encoder", enc), ("head", head), ("threshold", thr)):
        if not isinstance(value, dict):
            raise bad(entry, "an object", value)
    for key in ("id", "digest"):
        if not isinstance(enc.get(key), str) or not enc[key]:
            raise bad(f"encoder.{key}", "a non-empty string", enc.get(key))
    dim = enc.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise bad("encoder.dim", "a positive integer", dim)
    if head.get("kind") not in HEADS:
        raise bad("head.kind", f"one of {', '.join(HEADS)}", head.get("kind"))
    value = thr.get("value")
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise bad("threshold.value", "a number", value)
    cats = card.get("category_thresholds") or {}
    if not isinstance(cats, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in cats.values()
    ):
        raise bad("category_thresholds", "an object of numbers", cats)
    shapes = head.get("shapes")
    if not isinstance(shapes, dict) or not isinstance(shapes.get("net.0.weight"), list):
        raise bad("head.shapes", "an object of tensor shapes", shapes)
    first = shapes["net.0.weight"][0] if shapes["net.0.weight"] else None
    expected = expected_shapes(head["kind"], dim, first if isinstance(first, int) else HIDDEN)
    if shapes != expected:
        raise UserError(
            f"probe guard: {path}: head.shapes {shorten(shapes)} do not fit head.kind "
            f"{head['kind']!r} on encoder.dim {dim} (expected {shorten(expected)}); the card was "
            "edited or mixes two trainings: retrain with t2i-eval train-guard"
        )


def overlap(card: dict[str, Any], prompts: Sequence[Prompt]) -> int:
    """How many of `prompts` (by normalized text, see `text_key`) were in the training data."""
    seen = set(card.get("train_text_sha256", ()))
    return sum(text_key(p.text) in seen for p in prompts)


def sources_text(card: dict[str, Any]) -> str:
    """`core (216 prompts: 144 benign, 72 unsafe; digest 1a2b...)`, one per training suite."""
    parts = [
        f"{s['source']} ({s['n']} prompts: {s['benign']} benign, {s['unsafe']} unsafe; "
        f"digest {s['digest']})"
        for s in card.get("train", [])
    ]
    added = (card.get("counterexamples") or {}).get("added", 0)
    if added:
        parts.append(f"{added} counterexamples")
    return ", ".join(parts)


def report_lines(manifest: dict[str, Any], prompts: Sequence[Prompt] | None = None) -> list[str]:
    """Lines for the top of a report: for each prompt guard trained here (`trained_here` in its
    info), what it was trained on, and with `prompts` (the run's suite), how many of them were in
    its training data (numbers on those prompts measure memory, not generalization).

    The card is read again from the folder the guard ran from; if it is gone or unreadable, or
    its head is not the one the run used (`head_sha256` in the info: `train-guard --out` over
    the same folder retrains it), the line says so and the overlap is unknown (the manifest
    keeps the training sources either way)."""
    lines = []
    for c in manifest.get("components", []):
        info = c.get("info") or {}
        if c.get("stage") != "prompt_guard" or not info.get("trained_here"):
            continue
        name = c.get("name", "probe")
        lines.append(
            f"Prompt guard '{name}' was trained here (t2i-eval train-guard, {info.get('head')} head "
            f"on {info.get('encoder')}, {info.get('encoder_weights')} weights) on: "
            f"{info.get('train_sources_text') or 'unknown sources'}."
        )
        if prompts is None:
            continue
        try:
            card = read_card(info.get("path", ""))
        except UserError:
            lines.append(
                f"WARNING: the training card of '{name}' ({info.get('path')}) is gone or "
                "unreadable; overlap of this suite with its training data is unknown."
            )
            continue
        ran, now = info.get("head_sha256"), card["head"].get("sha256")
        if ran and now != ran:
            lines.append(
                f"WARNING: the guard folder of '{name}' ({info.get('path')}) was retrained since "
                f"this run (head sha256 {str(now)[:12]}, the run used {str(ran)[:12]}); overlap "
                "of this suite with the run's training data is unknown."
            )
            continue
        n = overlap(card, prompts)
        if n:
            lines.append(
                f"WARNING: {n} of {len(prompts)} prompts of this suite are in the training data "
                f"of '{name}'; its numbers on them measure memory, not generalization."
            )
    return lines
