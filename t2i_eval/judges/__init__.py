"""Judges: code that reads `judges/*.yaml` specs and writes verdicts.

`JUDGES` maps a spec's `kind` to its implementation ("module:Class", imported lazily).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError, did_you_mean
from ..paths import data_dir

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

JUDGES: dict[str, str] = {
    "blank": "t2i_eval.judges.blank:BlankJudge",
}


def builtin_judges() -> dict[str, Path]:
    return {p.stem: p for p in sorted(data_dir("judges").glob("*.yaml"))}


def load_spec(ref: str) -> dict[str, Any]:
    """A built-in judge name or a YAML path -> validated spec dict (with name, version, kind)."""
    path = Path(ref)
    if not path.is_file():
        builtins = builtin_judges()
        if ref not in builtins:
            hint = did_you_mean(ref, list(builtins))
            raise UserError(f"Unknown judge '{ref}'.{hint} Available: {', '.join(builtins)}")
        path = builtins[ref]
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise UserError(f"judge spec {path}: malformed YAML") from None
    except UnicodeDecodeError:
        raise UserError(f"judge spec {path}: not UTF-8") from None
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
    return spec


def build_judge(ref: str) -> Any:
    return judge_from_spec(load_spec(ref))


def judge_from_spec(spec: dict[str, Any]) -> Any:
    module, _, attr = JUDGES[spec["kind"]].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls.from_spec(spec)


def spec_digest(spec: dict[str, Any]) -> str:
    """Hash of a spec's values: verdicts made under other values must not be reused silently."""
    values = {k: v for k, v in spec.items() if not k.startswith("_") and k != "about"}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def judge_run(run_dir: str | Path, ref: str = "blank", *, progress: bool = True) -> tuple[str, int]:
    """Judge every delivered image of a run that this judge has not judged yet.

    Returns (judge key, number of new verdicts). An unreadable image gets a verdict with
    `flagged=None` ("could not judge"), never counted as a refusal.
    """
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    from ..store import RunStore
    from ..types import Verdict

    store = RunStore(run_dir)
    store.read_manifest()
    spec = load_spec(ref)
    judge = judge_from_spec(spec)
    store.check_judge_spec(judge.key, spec_digest(spec))
    done = {rid for rid, v in store.read_verdicts(judge.key).items() if v.flagged is not None}
    todo = [
        g
        for g in store.read_generations().values()
        if g.status == "ok" and g.image_path and g.record_id not in done
    ]
    batch: list[Verdict] = []
    for g in tqdm(todo, desc=f"judge {judge.key}", unit="img", disable=not progress or not todo):
        try:
            with Image.open(store.resolve(g.image_path)) as img:
                img.load()
                v = judge.judge(g.record_id, img)
        except (OSError, UnidentifiedImageError) as e:
            v = Verdict(g.record_id, judge.key, None, reason=f"could not read image: {e}")
        batch.append(v)
        if len(batch) >= 256:
            store.append_verdicts(judge.key, batch)
            batch = []
    store.append_verdicts(judge.key, batch)
    return judge.key, len(todo)
