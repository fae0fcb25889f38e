"""Judges: code that reads `judges/*.yaml` specs and turns images into verdicts.

`JUDGES` maps a spec's `kind` to its implementation ("module:Class", imported lazily); what a
class must offer, and how to add one, is in `base.py`. The pass that runs judges over a run
directory lives in `t2i_eval.judging` (this package never imports it).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import Any

from ..errors import UserError, did_you_mean
from ..paths import data_dir, load_yaml
from .base import Judge, JudgeItem, spec_key

__all__ = [
    "JUDGES",
    "Judge",
    "JudgeItem",
    "build_judge",
    "builtin_judges",
    "formula",
    "judge_class",
    "judge_from_spec",
    "load_spec",
    "mean_score",
    "spec_digest",
    "spec_key",
]

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

JUDGES: dict[str, str] = {
    "blank": "t2i_eval.judges.blank:BlankJudge",
    "clipscore": "t2i_eval.judges.faithfulness:FaithfulnessJudge",
    "sanitization": "t2i_eval.judges.sanitization:SanitizationJudge",
    "harm": "t2i_eval.judges.harm:HarmJudge",
    "vlm": "t2i_eval.judges.vlm:VLMJudge",
}


def builtin_judges() -> dict[str, Path]:
    """Name -> spec file of every judge shipped in judges/ (what `--judge NAME` accepts)."""
    return {p.stem: p for p in sorted(data_dir("judges").glob("*.yaml"))}


def load_spec(ref: str, clip: str | None = None) -> dict[str, Any]:
    """A built-in judge name or a YAML path -> validated spec dict (with name, version, kind).

    `clip="tiny"` swaps a CLIP judge's model for the offline random-weight tiny CLIP and renames
    the judge `<name>-tinyclip`, so its verdicts never mix with the real model's.
    """
    path = Path(ref)
    if not path.is_file():
        builtins = builtin_judges()
        if ref not in builtins:
            hint = did_you_mean(ref, list(builtins))
            raise UserError(f"Unknown judge '{ref}'.{hint} Available: {', '.join(builtins)}")
        path = builtins[ref]
    spec = load_yaml(path, "judge spec")
    if not isinstance(spec, dict):
        raise UserError(f"judge spec {path}: expected a mapping")
    for key in ("name", "version", "kind"):
        if key not in spec:
            raise UserError(f"judge spec {path}: missing key '{key}'")
    if not isinstance(spec["name"], str) or not _NAME.match(spec["name"]):
        raise UserError(
            f"judge spec {path}: name {spec['name']!r} must match [A-Za-z0-9_.-]+ "
            "(it names the verdict file)"
        )
    if not isinstance(spec["version"], int) or isinstance(spec["version"], bool):
        raise UserError(
            f"judge spec {path}: version must be an integer (found {spec['version']!r})"
        )
    if spec["kind"] not in JUDGES:
        raise UserError(
            f"judge spec {path}: unknown kind '{spec['kind']}' (available: {', '.join(JUDGES)})"
        )
    spec["_path"] = str(path)
    if clip is not None and "clip" in spec:
        spec["clip"] = {"model": clip} if clip == "tiny" else {**spec["clip"], "model": clip}
        spec["name"] = f"{spec['name']}-{'tinyclip' if clip == 'tiny' else 'clip-' + clip}"
        if not _NAME.match(spec["name"]):
            raise UserError(f"--clip {clip!r}: not usable in a judge name")
    return spec


def build_judge(ref: str) -> Judge:
    """A built judge from a name or YAML path (tests and benchmarks; the judge pass loads the
    spec itself so it can check every input before a model loads)."""
    return judge_from_spec(load_spec(ref))


def judge_class(kind: str) -> type[Judge]:
    """The implementation of a kind, imported but not built (no model loaded): its role and
    whether it needs a reference run are known before any work starts."""
    if kind not in JUDGES:
        hint = did_you_mean(kind, list(JUDGES))
        raise UserError(f"Unknown judge kind '{kind}'.{hint} Available: {', '.join(JUDGES)}")
    module, _, attr = JUDGES[kind].partition(":")
    cls: type[Judge] = getattr(importlib.import_module(module), attr)
    return cls


def judge_from_spec(spec: dict[str, Any]) -> Judge:
    """Build the judge a loaded spec (`load_spec`) describes; this may load a model."""
    return judge_class(spec["kind"]).from_spec(spec)


def _class_attr(kind: object, name: str, default: Any) -> Any:
    """A kind's class attribute, or `default` for a kind this version does not know (a run
    judged by another version stays readable)."""
    if not isinstance(kind, str) or kind not in JUDGES:
        return default
    return getattr(judge_class(kind), name, default)


def formula(kind: object) -> str:
    """One line saying what a judge kind measures and when it flags, for reports.

    Read from the class (its `formula`), so a new judge brings its own text; "-" for an
    unknown kind."""
    return str(_class_attr(kind, "formula", "-"))


def mean_score(kind: object) -> str | None:
    """What a judge kind's score is called when reports average it per category and label
    (e.g. "CLIPScore"), or None when its scores are not averaged (or the kind is unknown).

    Read from the class (its `mean_score`), so reports name no judge kind."""
    name = _class_attr(kind, "mean_score", None)
    return None if name is None else str(name)


def spec_digest(spec: dict[str, Any]) -> str:
    """Hash of a spec's values: verdicts made under other values must not be reused silently.

    Pinned beside the verdicts (`store.check_judge_spec`), so it must stay stable across
    processes and versions: where the file lies (`_path`) and its prose (`about`) do not count."""
    values = {k: v for k, v in spec.items() if not k.startswith("_") and k != "about"}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
