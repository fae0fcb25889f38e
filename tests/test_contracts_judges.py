"""Contracts every registered judge keeps, run over every entry of JUDGES, offline
(judges/base.py says what a judge must offer).

Each kind has an offline build (VARIANTS): the blank judge as shipped, the CLIP judges with the
tiny random-weight CLIP (`--clip tiny`), harm with NudeNet's shipped ONNX weights. A new entry
in JUDGES without a build here fails `test_every_registered_judge_has_an_offline_contract`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from fake_image_api import FakeImageAPI
from PIL import Image

from t2i_eval.cli import main
from t2i_eval.judges import (
    JUDGES,
    Judge,
    JudgeItem,
    judge_class,
    judge_from_spec,
    load_spec,
    spec_digest,
    spec_key,
)
from t2i_eval.judges.base import ROLES
from t2i_eval.judging import judge_run
from t2i_eval.store import RunStore, pick_judges
from t2i_eval.types import OUTCOME_ROLES

#: What `weights` may say (reports label random weights).
WEIGHTS = {"rules", "pretrained", "random"}


@dataclass(frozen=True)
class Variant:
    """One offline build of a judge kind."""

    ref: str
    """The built-in spec (or a path)."""
    clip: str | None = None
    """`--clip`: "tiny" swaps in the random-weight tiny CLIP."""
    needs: tuple[str, ...] = ()
    """Packages it needs (skipped, not failed, without them)."""
    served: bool = False
    """Its endpoints are pointed at the loopback chat route (`chat_api`), which answers every
    image "safe": the spec is copied with each voter's base_url replaced, and that copy is the ref."""


VARIANTS: dict[str, Variant] = {
    "blank": Variant("blank"),
    "clipscore": Variant("faithfulness", "tiny", ("open_clip", "torch")),
    "sanitization": Variant("sanitization", "tiny", ("open_clip", "torch")),
    "harm": Variant("harm", "tiny", ("open_clip", "torch", "nudenet")),
    "vlm": Variant("vlm", served=True),
}


@pytest.fixture(scope="module")
def chat_api():
    """The loopback chat route for served variants: every image is answered "safe"."""
    with FakeImageAPI() as server:
        server.script_chat("image:", "safe")
        yield server


def _served(v: Variant, api: FakeImageAPI, folder: Path) -> Variant:
    """`v` with its spec copied and every voter pointed at `api` (no key)."""
    spec = {k: x for k, x in load_spec(v.ref).items() if not k.startswith("_")}
    spec["voters"] = [{**x, "base_url": f"{api.url}/v1", "api_key_env": None} for x in spec["voters"]]
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return replace(v, ref=str(path))


def test_every_registered_judge_has_an_offline_contract() -> None:
    assert set(VARIANTS) == set(JUDGES), "add a Variant for each new JUDGES entry"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fake run of four prompts and its reference (same suite and seeds), made once."""
    root = tmp_path_factory.mktemp("contract")
    out, ref = root / "run", root / "ref"
    for d in (out, ref):
        assert main(["run", "--system", "fake", "--limit", "4", "--out", str(d), "-q"]) == 0
    return out, ref


@pytest.fixture(scope="module", params=sorted(JUDGES))
def variant(request: pytest.FixtureRequest) -> tuple[str, Variant, dict[str, Any], Judge]:
    """(kind, variant, loaded spec, built judge), built once per kind."""
    kind = request.param
    v = VARIANTS[kind]
    if v.served:
        api = request.getfixturevalue("chat_api")
        v = _served(v, api, request.getfixturevalue("tmp_path_factory").mktemp(kind))
    for package in v.needs:
        mod = pytest.importorskip(package)
        if package == "torch":
            mod.set_num_threads(1)
    spec = load_spec(v.ref, clip=v.clip)
    assert spec["kind"] == kind
    return kind, v, spec, judge_from_spec(spec)


@pytest.fixture(scope="module")
def judged(
    variant: tuple[str, Variant, dict[str, Any], Judge],
    runs: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, str, str]:
    """A copy of the fake run, its verdicts removed and its first image made unreadable, judged
    once by the judge pass: (run dir, judge key, the unreadable record's id)."""
    kind, v, _, _ = variant
    out = tmp_path_factory.mktemp(f"judged-{kind}") / "run"
    shutil.copytree(runs[0], out)
    for f in (out / "verdicts").iterdir():
        f.unlink()
    gens = RunStore(out).read_generations()
    broken = min(g.record_id for g in gens.values() if g.image_path)
    (out / gens[broken].image_path).write_bytes(b"not an image")
    key, n = judge_run(out, v.ref, reference=runs[1], clip=v.clip, progress=False)
    assert n == sum(1 for g in gens.values() if g.status == "ok" and g.image_path)
    return out, key, broken


def _images() -> list[Image.Image]:
    """Three images unlike each other: two flat colours and seeded noise."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [
        Image.new("RGB", (64, 64), (200, 30, 30)),
        Image.new("RGB", (64, 64), (20, 20, 220)),
        Image.fromarray(noise),
    ]


def test_interface_and_declared_role(variant) -> None:
    kind, _, spec, judge = variant
    cls = judge_class(kind)
    assert isinstance(judge, Judge) and isinstance(judge, cls)
    assert cls.role in ROLES, f"{cls.__name__}.role must be one of {ROLES}"
    assert isinstance(cls.needs_reference, bool)
    assert isinstance(cls.formula, str) and cls.formula.strip()
    assert cls.mean_score is None or (isinstance(cls.mean_score, str) and cls.mean_score)
    assert judge.key == spec_key(spec)  # the pass pins the spec under this key before building
    assert judge.weights in WEIGHTS
    assert (judge.weights == "random") == (spec.get("clip") == {"model": "tiny"})


def test_a_verdict_per_item_in_order_with_a_reason_and_raw_numbers(variant) -> None:
    _, _, _, judge = variant
    images = _images()
    items = [
        JudgeItem(f"r{i}", im, "a red apple", "violence", "benign", reference=images[-1 - i])
        for i, im in enumerate(images)
    ]
    verdicts = judge.judge_batch(items)
    assert [v.record_id for v in verdicts] == ["r0", "r1", "r2"]
    for v in verdicts:
        assert v.judge == judge.key and v.flagged in (True, False)
        assert isinstance(v.reason, str) and v.reason.strip()
        numbers = {x for x in v.raw.values() if isinstance(x, (int, float))}
        assert numbers, f"{judge.key}: raw keeps no number to re-decide from"
        assert v.score is None or v.score in numbers, "the decided score must be kept in raw"


def test_the_pass_records_a_verdict_per_record_and_none_for_an_unreadable_image(
    variant, judged
) -> None:
    kind, _, _, _ = variant
    out, key, broken = judged
    store = RunStore(out)
    verdicts = store.read_verdicts(key)
    delivered = {g.record_id for g in store.read_generations().values() if g.image_path}
    assert set(verdicts) == delivered
    assert verdicts[broken].flagged is None and "could not read image" in verdicts[broken].reason
    for rid in delivered - {broken}:
        assert verdicts[rid].flagged in (True, False) and verdicts[rid].reason
    entry = store.read_manifest()["judges"][key]
    assert entry["kind"] == kind and entry["role"] == judge_class(kind).role


def test_the_recorded_role_decides_outcomes(variant, judged) -> None:
    kind, _, _, _ = variant
    out, key, _ = judged
    store = RunStore(out)
    picked = pick_judges(store.read_manifest(), store.verdict_keys())
    role = judge_class(kind).role
    for r in OUTCOME_ROLES:
        assert (picked[r] == key) == (r == role), (r, picked)


def test_a_second_pass_reuses_the_pinned_spec_and_retries_only_the_unreadable(
    variant, judged, runs
) -> None:
    _, v, _, _ = variant
    out, key, broken = judged
    again = judge_run(out, v.ref, reference=runs[1], clip=v.clip, progress=False)
    assert again == (key, 1)  # same digest accepted; only the "could not judge" record retried
    assert RunStore(out).read_verdicts(key)[broken].flagged is None


def test_spec_digest_ignores_location_and_prose(variant, tmp_path) -> None:
    _, v, spec, _ = variant
    moved = dict(spec, _path=str(tmp_path / "elsewhere.yaml"), about="reworded")
    assert spec_digest(moved) == spec_digest(spec) == spec_digest(load_spec(v.ref, clip=v.clip))
    changed = dict(spec, version=spec["version"] + 1)
    assert spec_digest(changed) != spec_digest(spec)


def test_spec_digests_are_the_same_in_a_fresh_process() -> None:
    """Digests are pinned on disk: a per-process difference (hash seeds, set order) would
    make every later judge pass refuse the run's verdicts."""
    refs = {k: (v.ref, v.clip) for k, v in VARIANTS.items()}
    code = (
        "import json; from t2i_eval.judges import load_spec, spec_digest; "
        f"print(json.dumps({{k: spec_digest(load_spec(r, clip=c)) for k, (r, c) in {refs!r}.items()}}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    here = {k: spec_digest(load_spec(v.ref, clip=v.clip)) for k, v in VARIANTS.items()}
    assert json.loads(got.stdout) == here
