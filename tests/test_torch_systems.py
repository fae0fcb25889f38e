"""Torch-backed components on the tiny random-weight pipeline (offline, one thread)."""

import json

import numpy as np
import pytest
from PIL import Image
from tiny_parts import checker_copy

from t2i_eval.cli import main
from t2i_eval.systems.safety_checker import decide

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir():
    from t2i_eval.systems.tiny import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="module")
def gen(tiny_dir):
    from t2i_eval.systems.tiny import TinyGenerator

    return TinyGenerator()


def test_tiny_saved_as_safetensors_and_marked_random(tiny_dir):
    files = [p.name for p in tiny_dir.rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert json.loads((tiny_dir / "T2I_EVAL_TINY.json").read_text())["weights"] == "random"
    assert (tiny_dir / "safety_checker").is_dir() and (tiny_dir / "model_index.json").exists()


def test_tokenizer_is_stable_diffusions(gen):
    # ids of Stable Diffusion's CLIP tokenizer for "a cat" (bos, a, cat, eos)
    assert gen.pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_loaded_through_from_pretrained_without_checker(gen):
    assert type(gen.pipe).__name__ == "StableDiffusionPipeline"
    assert gen.pipe.safety_checker is None


def test_seeds_are_per_image_and_batch_independent(gen):
    batch = gen.generate(["a red house", "a blue car", "a red house"], [0, 0, 1])
    single = gen.generate(["a blue car"], [0])
    a, b, c = (np.asarray(r.image, dtype=np.int16) for r in batch)
    assert batch[0].image.size == (64, 64)
    assert np.abs(a - c).max() > 0  # another seed, another image
    assert np.abs(b - np.asarray(single[0].image, dtype=np.int16)).max() <= 1
    assert all(r.decision.refused is False for r in batch)
    assert batch[0].decision.raw["builtin_nsfw_flag"] is None  # built with safety_checker=None


def test_decide_matches_diffusers_rule_on_numbers():
    # special concept 1 fires (0.5-0.4 > 0) -> adjustment 0.01 for later scores
    d = decide([0.30, 0.10], [0.295, 0.5], [0.1, 0.5], [0.2, 0.4])
    assert d["special_care"] == [1] and d["adjustment"] == 0.01
    assert d["concept_scores"] == [0.015, -0.39] and d["bad_concepts"] == [0]
    d = decide([0.30], [0.295], [0.1], [0.2])
    assert d["concept_scores"] == [0.005] and d["bad_concepts"] == [0]
    assert decide([0.30], [0.31], [0.0], [0.2])["bad_concepts"] == []


@pytest.mark.parametrize("weight,flag", [(-1.0, True), (100.0, False)])
def test_safety_checker_known_answers_and_agrees_with_diffusers(tiny_dir, tmp_path, weight, flag):
    from t2i_eval.systems.safety_checker import SafetyCheckerGuard

    guard = SafetyCheckerGuard(model=str(checker_copy(tiny_dir, tmp_path, weight)), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    decisions = guard.check(images)
    assert [d.refused for d in decisions] == [flag] * 3
    d = decisions[0]
    assert len(d.raw["concept_cos"]) == 17 and len(d.raw["special_cos"]) == 3
    assert d.raw["concept_thresholds"] == [weight] * 17
    assert d.threshold == 0.0 and (d.score > 0) == flag
    # the model's own forward (which blacks out images) reaches the same decision
    pixels = guard.processor(images=images, return_tensors="pt").pixel_values
    blacked, has_nsfw = guard.checker(pixels, [np.asarray(i, dtype=np.float32) for i in images])
    assert list(has_nsfw) == [flag] * 3
    assert (np.abs(blacked[0]).max() == 0) == flag


def test_cli_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--system",
                "default",
                "--limit",
                "6",
                "--batch-size",
                "4",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "| violence |" in text
    lines = (out / "generations" / "rank-0.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 6 and {r["status"] for r in recs} <= {"ok", "refused"}
    for r in recs:
        if r["status"] == "ok":
            stages = [d["stage"] for d in r["decisions"]]
            assert stages == ["prompt_guard", "generator", "image_guard"]
            with Image.open(out / r["image_path"]) as img:
                assert img.size == (64, 64)
        else:
            assert r["refused_by"] == "prompt_guard:blocklist" and r["image_path"] is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    weights = {c["name"]: c["weights"] for c in manifest["components"]}
    assert weights == {"blocklist": "rules", "tiny": "random", "safety_checker": "random"}
    # rerun: nothing regenerated
    assert main(["run", "--system", "default", "--limit", "6", "--out", str(out), "-q"]) == 0
    assert "(0 generated, 6 already done)" in capsys.readouterr().out


def test_overt_mini_through_tiny(overt_dir, tmp_path, capsys):
    out = tmp_path / "overt"
    assert (
        main(
            [
                "run",
                "--suite",
                str(overt_dir / "OVERT_mini.csv"),
                "--system",
                "tiny",
                "--limit",
                "10",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    recs = (out / "generations" / "rank-0.jsonl").read_text().splitlines()
    assert len(recs) == 10


def test_diffusers_generator_bad_model_is_user_error(tmp_path):
    from t2i_eval.errors import UserError
    from t2i_eval.systems.diffusers import DiffusersGenerator

    with pytest.raises(UserError, match="could not load"):
        DiffusersGenerator(model=str(tmp_path / "nothing-here"), device="cpu")


def test_tiny_folder_loaded_by_path_is_still_marked_random(tiny_dir):
    from t2i_eval.systems.diffusers import DiffusersGenerator
    from t2i_eval.systems.safety_checker import SafetyCheckerGuard

    assert DiffusersGenerator(model=str(tiny_dir), device="cpu", steps=1).weights == "random"
    assert SafetyCheckerGuard(model=str(tiny_dir), device="cpu").weights == "random"
