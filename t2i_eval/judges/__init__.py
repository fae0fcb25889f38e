"""Judges: code that reads `judges/*.yaml` specs and writes verdicts.

`JUDGES` maps a spec's `kind` to its implementation ("module:Class", imported lazily).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from ..errors import UserError, did_you_mean
from ..paths import data_dir, load_yaml

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

JUDGES: dict[str, str] = {
    "blank": "t2i_eval.judges.blank:BlankJudge",
    "clipscore": "t2i_eval.judges.clip_judges:FaithfulnessJudge",
    "sanitization": "t2i_eval.judges.clip_judges:SanitizationJudge",
    "harm": "t2i_eval.judges.harm:HarmJudge",
}


def builtin_judges() -> dict[str, Path]:
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


def build_judge(ref: str) -> Any:
    return judge_from_spec(load_spec(ref))


def judge_class(spec: dict[str, Any]) -> type:
    """The implementation of a spec's kind, imported but not built (no model loaded)."""
    module, _, attr = JUDGES[spec["kind"]].partition(":")
    return getattr(importlib.import_module(module), attr)


def judge_from_spec(spec: dict[str, Any]) -> Any:
    return judge_class(spec).from_spec(spec)


def spec_digest(spec: dict[str, Any]) -> str:
    """Hash of a spec's values: verdicts made under other values must not be reused silently."""
    values = {k: v for k, v in spec.items() if not k.startswith("_") and k != "about"}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _open_image(store: Any, rel: str) -> Any:
    from PIL import Image

    with Image.open(store.resolve(rel)) as img:
        img.load()
        return img.convert("RGB")


def judge_run(
    run_dir: str | Path,
    ref: str = "blank",
    *,
    reference: str | Path | None = None,
    clip: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[str, int]:
    """Judge every delivered image of a run that this judge has no usable verdict on yet.

    Returns (judge key, number of records judged). An unreadable image gets a verdict with
    `flagged=None` ("could not judge"), never counted as a refusal, and is tried again next time.
    `reference` is the run to compare with (sanitization); `clip` overrides the spec's CLIP model.
    """
    from PIL import UnidentifiedImageError
    from tqdm import tqdm

    from ..store import RunStore
    from ..types import Verdict
    from .clip_judges import JudgeItem

    store = RunStore(run_dir)
    manifest = store.read_manifest()
    spec = load_spec(ref, clip=clip)
    ref_gens: dict[str, Any] = {}
    ref_store = None
    # every input is checked before the judge is built: building may load a large model
    if getattr(judge_class(spec), "needs_reference", False):
        if reference is None:
            raise UserError(
                f"judge {spec['name']}@{spec['version']} compares with a reference run: "
                "pass --reference RUN_DIR"
            )
        ref_store = RunStore(reference)
        ref_manifest = ref_store.read_manifest()
        if ref_manifest["suite"].get("digest") != manifest["suite"].get("digest"):
            raise UserError(
                f"--reference {reference}: ran another suite (digest "
                f"{ref_manifest['suite'].get('digest')} vs {manifest['suite'].get('digest')})"
            )
        ref_gens = ref_store.read_generations()
    judge = judge_from_spec(spec)
    pinned = dict(spec)
    if ref_store is not None:  # verdicts are only valid against the reference they were made with
        pinned["reference_run"] = {
            "system": ref_manifest["system"]["digest"],
            "created_at": ref_manifest.get("created_at"),
            "path": str(ref_store.root.resolve()),
        }
    store.check_judge_spec(judge.key, spec_digest(pinned))
    prompts = {p.id: p for p in store.read_prompts()}
    done = {rid for rid, v in store.read_verdicts(judge.key).items() if v.flagged is not None}
    todo = [
        g
        for g in store.read_generations().values()
        if g.status == "ok" and g.image_path and g.record_id not in done
    ]
    judges_info = dict(manifest.get("judges", {}))
    previous = judges_info.get(judge.key, {})
    judges_info[judge.key] = {
        "kind": spec["kind"],
        "weights": getattr(judge, "weights", "rules"),
        "reference": str(reference) if reference else None,
        "spec": spec.get("_path"),
        "clip": clip,
        # a rerun with nothing new to judge must not make this judge decide outcomes again
        "at": _now() if todo or not previous else previous.get("at", _now()),
    }
    store.update_manifest(judges=judges_info)
    bar = tqdm(
        total=len(todo), desc=f"judge {judge.key}", unit="img", disable=not progress or not todo
    )
    unreadable: list[str] = []
    with bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            items, verdicts = [], []
            for g in chunk:
                p = prompts.get(g.prompt_id)
                try:
                    image = _open_image(store, g.image_path)
                except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                    # PIL raises SyntaxError/ValueError on some broken headers
                    unreadable.append(f"{g.image_path} ({e})")
                    verdicts.append(
                        Verdict(g.record_id, judge.key, None, reason=f"could not read image: {e}")
                    )
                    continue
                reference_image = None
                rg = ref_gens.get(g.record_id)
                if ref_store is not None and rg is not None and rg.status == "ok" and rg.image_path:
                    try:
                        reference_image = _open_image(ref_store, rg.image_path)
                    except (OSError, UnidentifiedImageError):
                        reference_image = None
                items.append(
                    JudgeItem(
                        g.record_id,
                        image,
                        p.text if p else "",
                        p.category if p else "",
                        p.label if p else "",
                        reference_image,
                    )
                )
            if items:
                verdicts += judge.judge_batch(items)
            store.append_verdicts(judge.key, verdicts)
            bar.update(len(chunk))
    if unreadable:
        log.warning(
            "%s: %d image(s) could not be read, e.g. %s; recorded as unjudged (never a refusal) "
            "and tried again by the next judge pass. To generate them again, delete the files "
            "and rerun the run command",
            judge.key,
            len(unreadable),
            unreadable[0],
        )
    return judge.key, len(todo)
