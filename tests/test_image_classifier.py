"""The `image-classifier` image guard on a tiny random-weight ViT saved and loaded back (offline):
its score is the model's own softmax P(unsafe labels), the threshold decides, raw keeps every
label, and a run through the CLI records its decisions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_parts import VIT_LABELS, save_tiny_vit

from t2i_eval.errors import UserError
from t2i_eval.types import StageDecision

NAME = "image-classifier"
LABELS = VIT_LABELS


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(1)
    return save_tiny_vit(tmp_path_factory.mktemp("vit") / "model")


def _guard(vit: Path, **options):
    from t2i_eval.systems.image_classifier import ImageClassifierGuard

    return ImageClassifierGuard(model=str(vit), device="cpu", weights="random", **options)


def _images() -> list[Image.Image]:
    """Distinct pictures of different sizes and modes (the processor resizes each)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [
        Image.new("RGB", (64, 64), (200, 30, 30)),
        Image.fromarray(rng.integers(0, 256, (40, 17, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (20, 300), dtype=np.uint8)),  # grayscale
        Image.new("RGBA", (33, 90), (10, 240, 90, 128)),
    ]


def _direct_p_nsfw(vit: Path, images: list[Image.Image]) -> list[float]:
    """P(nsfw) from the saved model and processor, without the guard."""
    import torch
    from transformers import ViTForImageClassification, ViTImageProcessor

    model = ViTForImageClassification.from_pretrained(vit).eval()
    processor = ViTImageProcessor.from_pretrained(vit)
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    with torch.inference_mode():
        probs = torch.softmax(model(**pixels).logits, dim=-1)
    return probs[:, 1].tolist()


def test_score_is_the_models_own_probability_of_the_unsafe_label(vit):
    guard = _guard(vit)
    images = _images()
    decisions = guard.check(images)
    assert guard.unsafe_labels == ["nsfw"]  # picked by name when the spec names none
    assert len(decisions) == len(images)
    for d, p in zip(decisions, _direct_p_nsfw(vit, images), strict=True):
        assert (d.stage, d.name) == ("image_guard", "image-classifier")
        assert abs(d.score - p) <= 1e-6
        assert set(d.raw["probs"]) == {"normal", "nsfw"}  # every label kept
        assert sum(d.raw["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert d.refused == (d.score > 0.5) and d.threshold == 0.5


def test_the_threshold_decides(vit):
    scores = [d.score for d in _guard(vit).check(_images())]
    assert min(scores) < max(scores), "the pictures must score differently"
    middle = (min(scores) + max(scores)) / 2
    decisions = _guard(vit, threshold=middle).check(_images())
    assert [d.refused for d in decisions] == [s > middle for s in scores]
    assert {d.refused for d in decisions} == {True, False}
    refused = next(d for d in decisions if d.refused)
    assert "P(nsfw)" in refused.message and str(middle) in refused.message


def test_naming_the_other_label_unsafe_scores_its_probability(vit):
    images = _images()
    normal = _guard(vit, unsafe_labels=["normal"]).check(images)
    for d, p in zip(normal, _direct_p_nsfw(vit, images), strict=True):
        assert abs(d.score - (1 - p)) <= 2e-6


def test_decide_reproduces_every_stored_decision(vit):
    from t2i_eval.systems.image_classifier import decide

    for d in _guard(vit, threshold=0.4).check(_images()):
        stored = StageDecision.from_dict(json.loads(json.dumps(d.to_dict())))
        assert decide(stored.raw["probs"], stored.raw["unsafe_labels"], 0.4) == (
            stored.score,
            stored.refused,
        )


def test_a_batch_of_mixed_sizes_equals_each_image_alone(vit):
    guard = _guard(vit, batch_size=3)  # two model batches for four images
    images = _images()
    together = guard.check(images)
    alone = [guard.check([im])[0] for im in images]
    assert [d.raw for d in together] == [d.raw for d in alone]


def test_an_image_it_cannot_process_is_could_not_check_not_a_pass(vit):
    images = [_images()[0], Image.new("RGB", (0, 0)), _images()[1]]
    first, empty, last = _guard(vit).check(images)
    assert empty.refused is None and "could not process the image" in empty.message
    assert empty.score is None
    assert first.refused is not None and last.refused is not None


def test_unsafe_labels_the_model_lacks_is_a_one_line_error_at_build(vit):
    from t2i_eval.systems import ComponentSpec, build_component

    spec = ComponentSpec("image-classifier", {"model": str(vit), "unsafe_labels": ["porn"]})
    with pytest.raises(UserError) as e:
        build_component("image guard", spec)
    message = str(e.value)
    assert "\n" not in message
    assert "['porn']" in message and "normal, nsfw" in message


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"trust_remote_code": "yes"}, "trust_remote_code must be true or false"),
        ({"weights": "trained"}, "weights must be pretrained or random"),
    ],
)
def test_bad_option_values_are_refused(vit, options, match):
    from t2i_eval.systems.image_classifier import ImageClassifierGuard

    with pytest.raises(UserError, match=match):
        ImageClassifierGuard(model=str(vit), **options)


def test_a_folder_that_is_no_model_is_a_user_error(tmp_path):
    from t2i_eval.systems.image_classifier import ImageClassifierGuard

    with pytest.raises(UserError, match=r"image-classifier: could not load '.*' as an image"):
        ImageClassifierGuard(model=str(tmp_path), device="cpu")


def test_missing_transformers_names_the_extra(vit, monkeypatch):
    from t2i_eval.systems.image_classifier import ImageClassifierGuard

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as when not installed
    with pytest.raises(UserError, match=r"needs transformers: pip install 't2i-eval\[diffusers\]'"):
        ImageClassifierGuard(model=str(vit))


def test_a_calibrated_thresholds_file_sets_the_threshold(vit, tmp_path):
    from t2i_eval.systems import ComponentSpec, SystemSpec, validate_spec

    path = tmp_path / "conformal_thresholds.json"
    entry = {"units": "score", "threshold": 0.25}
    path.write_text(json.dumps({"kind": "conformal", "guards": {NAME: entry}}))
    guard = _guard(vit, thresholds=str(path))
    assert guard.threshold == 0.25
    assert guard.info()["thresholds_file"]["path"] == str(path)
    both = {"model": str(vit), "threshold": 0.5, "thresholds": str(path)}
    spec = SystemSpec("s", ComponentSpec("fake"), image_guards=(ComponentSpec(NAME, both),))
    with pytest.raises(UserError, match="give 'threshold' or 'thresholds'"):
        validate_spec(spec)


def test_importing_the_module_loads_no_torch():
    code = (
        "import sys, t2i_eval.systems.image_classifier; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_run_records_the_guards_decisions(vit, tmp_path):
    from t2i_eval.cli import main
    from t2i_eval.systems import parse_system

    system = f"fake>image-classifier:{vit}"
    spec = parse_system(system)  # GENERATOR>IMAGE_GUARDS when the first part is a generator
    assert spec.generator.name == "fake" and not spec.prompt_guards
    assert [c.name for c in spec.image_guards] == ["image-classifier"]
    out = tmp_path / "run"
    argv = ["run", "--system", system, "--limit", "6", "--out", str(out), "-q"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "image-classifier" in json.dumps(manifest)
    lines = (out / "generations" / "rank-0.jsonl").read_text().splitlines()
    gens = [json.loads(x) for x in lines]
    assert len(gens) == 6
    for g in gens:
        (d,) = [d for d in g["decisions"] if d["name"] == "image-classifier"]
        assert set(d["raw"]["probs"]) == {"normal", "nsfw"}
        assert d["refused"] == (d["score"] > 0.5)
        assert g["status"] == ("refused" if d["refused"] else "ok")
        assert (g["refused_by"] == "image_guard:image-classifier") == d["refused"]
