"""`thresholds: FILE`, the option every guard with a score shares: read a threshold that
`t2i-eval sweep` calibrated on one run (sweep/conformal_thresholds.json or
sweep/proposed_thresholds.json) so the calibrated guard can run on another suite.

The file is checked when the system spec is (before any run directory exists) and recorded in
the manifest with its sha256 through the guard's `info()`, so a run says where its thresholds
came from. One file, two shapes (both written by `sweep.run_sweep`):

- conformal: `{"kind": "conformal", "guards": {GUARD: {"units": U, "threshold": T, ...}}}`;
  T is the value to apply (with --per-category, the most conservative category's).
- proposed: `{"proposals": {GUARD: {CATEGORY: {"reachable": ..., "threshold": ..., "units":
  ...}}}}`; a scalar guard takes the "all" row, the concept guard its categories' own rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

#: Larger than any file a sweep writes by far; reading a wrong, huge path stops here.
MAX_BYTES = 16 * 2**20


@dataclass(frozen=True)
class FileThresholds:
    """What one guard takes from a thresholds file."""

    path: str
    sha256: str
    """Of the file's bytes: the manifest records it, so a later edit of the file shows."""
    kind: str
    """'conformal' or 'proposed'."""
    threshold: float | None
    """The scalar to apply, in `units` (None: the file has only per-category rows)."""
    units: str
    """'score' (refuse when score > threshold) or 'adjustment' (the safety checker's offset)."""
    own: dict[str, float] = field(default_factory=dict)
    """Per-category thresholds in the guard's own units (the concept guard, proposed files)."""

    def info(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "kind": self.kind}


def _found(value: Any) -> str:
    return {bool: "true/false", str: "text", list: "a list", dict: "a mapping"}.get(
        type(value), "null" if value is None else "a number"
    )


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, found {_found(value)}")
    return float(value)


def _load(path: str, guard: str) -> tuple[dict[str, Any], str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"{guard}: thresholds file {path} not found; expected a sweep's "
            "conformal_thresholds.json or proposed_thresholds.json (t2i-eval sweep RUN_DIR)"
        )
    if p.stat().st_size > MAX_BYTES:
        raise UserError(f"{guard}: thresholds file {path} is over {MAX_BYTES >> 20} MiB")
    raw = p.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{guard}: thresholds file {path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not (
        isinstance(data.get("guards"), dict) or isinstance(data.get("proposals"), dict)
    ):
        keys = sorted(data) if isinstance(data, dict) else _found(data)
        raise UserError(
            f"{guard}: thresholds file {path}: expected a mapping with 'guards' (a sweep's "
            f"conformal_thresholds.json) or 'proposals' (proposed_thresholds.json), found {keys}"
        )
    return data, hashlib.sha256(raw).hexdigest()


def read_thresholds(
    path: str, guard: str, units: str = "score", per_category: bool = False
) -> FileThresholds:
    """The thresholds `guard` takes from `path`, checked (one-line UserErrors).

    `units`: what the guard's scalar threshold means ('score', or 'adjustment' for the safety
    checker); an entry in other units is refused. `per_category`: the guard can take
    per-category thresholds in its own units (the concept guard) from a proposed file."""
    data, digest = _load(path, guard)
    kind = "conformal" if isinstance(data.get("guards"), dict) else "proposed"
    table = data["guards"] if kind == "conformal" else data["proposals"]
    if guard not in table:
        raise UserError(
            f"{guard}: thresholds file {path} has no entry for guard '{guard}' (has: "
            f"{', '.join(map(str, table)) or 'none'}); sweep a run of that guard: "
            f"t2i-eval sweep RUN_DIR --guard {guard}"
        )
    entry = table[guard]
    where = f"{guard}: thresholds file {path}: {'guards' if kind == 'conformal' else 'proposals'}.{guard}"
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a mapping, found {_found(entry)}")
    if kind == "conformal":
        found_units = entry.get("units")
        if found_units != units:
            raise UserError(
                f"{where}.units is {found_units!r}; guard '{guard}' needs {units!r} (was the "
                "file edited, or written for another guard?)"
            )
        value = _number(entry.get("threshold"), f"{where}.threshold")
        return FileThresholds(path, digest, kind, value, units)
    own: dict[str, float] = {}
    scalar: float | None = None
    for cat, row in entry.items():
        at = f"{where}.{cat}"
        if not isinstance(row, dict):
            raise UserError(f"{at} must be a mapping, found {_found(row)}")
        if row.get("reachable") is not True:
            continue
        value = _number(row.get("threshold"), f"{at}.threshold")
        row_units = row.get("units", "score")
        if cat == "all" and row_units == units:
            scalar = value
        elif cat != "all" and row_units == "own" and per_category:
            own[str(cat)] = value
        elif cat == "all" or row_units not in ("own", "score", "adjustment"):
            raise UserError(f"{at}.units is {row_units!r}; guard '{guard}' needs {units!r}")
    if scalar is None and not own:
        raise UserError(
            f"{where}: no proposal reaches the sweep's target for this guard (every row "
            "'reachable' false or null); sweep again with a lower --target"
        )
    if not per_category and scalar is None:
        raise UserError(f"{where}.all: no reachable overall proposal to apply")
    return FileThresholds(path, digest, kind, scalar, units, own)


def check_file_option(
    guard: str,
    options: dict[str, Any],
    units: str = "score",
    per_category: bool = False,
    instead_of: str = "threshold",
) -> None:
    """A guard's `check_options`: the file is read and checked when the spec is, before any
    run directory exists. A file and an explicit `instead_of` value would be two answers to
    one question: refused. A non-text value is left to `options.check_values`."""
    path = options.get("thresholds")
    if not isinstance(path, str):
        return
    if options.get(instead_of) is not None:
        raise UserError(
            f"{guard}: give '{instead_of}' or 'thresholds' (a file of calibrated thresholds), "
            "not both"
        )
    read_thresholds(path, guard, units, per_category)


def scalar_threshold(from_file: FileThresholds | None, given: float) -> float:
    """The threshold a scalar guard applies: the file's when there is one, else its option's
    (a spec holding both is refused by `check_file_option` before the guard is built)."""
    if from_file is not None and from_file.threshold is not None:
        return from_file.threshold
    return float(given)


def file_info(from_file: FileThresholds | None) -> dict[str, Any]:
    """The manifest's record of where a guard's thresholds came from (nothing when from the spec)."""
    return {"thresholds_file": from_file.info()} if from_file is not None else {}
