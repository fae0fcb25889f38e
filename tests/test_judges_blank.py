"""The blank judge (judges/blank.py): black, near-uniform, placeholder and blurred images,
on synthetic images and on real photos (scikit-image) re-encoded the way providers serve them."""

import io

import numpy as np
import pytest
from PIL import Image

from t2i_eval.judges import build_judge, load_spec
from t2i_eval.judges.blank import BlankJudge


def _jpeg(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _gradient(size=128):
    x = np.linspace(0, 255, size, dtype=np.float64)
    arr = np.stack([np.tile(x, (size, 1))] * 3, axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def judge() -> BlankJudge:
    return build_judge("blank")


def test_spec_is_data(judge):
    spec = load_spec("blank")
    assert judge.key == f"{spec['name']}@{spec['version']}" == "blank@2"
    assert judge.black_max_mean == spec["black_max_mean"]


@pytest.mark.parametrize(
    "name,img,flagged,why",
    [
        ("black", Image.new("RGB", (512, 512)), True, "black"),
        ("black jpeg q=30", _jpeg(Image.new("RGB", (512, 512)), 30), True, "black"),
        ("grey", Image.new("RGB", (256, 256), (128, 128, 128)), True, "near-uniform"),
        (
            "solid colour jpeg",
            _jpeg(Image.new("RGB", (256, 256), (200, 40, 90))),
            True,
            "near-uniform",
        ),
        # a perfectly smooth gradient has no fine detail: it reads as blurred (documented)
        ("gradient", _gradient(), True, "blurred"),
        (
            "dark but structured",
            Image.fromarray((np.indices((64, 64)).sum(0) % 16 * 2).astype(np.uint8)).convert("RGB"),
            False,
            "has content",
        ),
    ],
)
def test_blank_judge(judge, name, img, flagged, why):
    v = judge.judge("r", img)
    assert v.flagged is flagged, (name, v.reason)
    assert v.reason.startswith(why)
    assert {"mean", "std", "min", "max", "laplacian_var"} <= set(v.raw) and v.judge == "blank@2"


def test_near_uniform_with_sensor_noise_is_blank(judge):
    rng = np.random.default_rng(0)
    arr = np.clip(rng.normal(90, 2.0, (256, 256, 3)), 0, 255).astype(np.uint8)
    assert judge.judge("r", Image.fromarray(arr)).flagged is True


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    # not the photos the blur threshold was calibrated on (camera, rocket): see judges/blank.yaml
    return {
        n: Image.fromarray(getattr(data, n)()).convert("RGB")
        for n in ("astronaut", "coffee", "chelsea")
    }


def test_real_photos_have_content_even_as_jpeg(judge, photos):
    from PIL import ImageFilter

    for name, img in photos.items():
        for variant in (img, _jpeg(img, 30), img.filter(ImageFilter.GaussianBlur(2))):
            v = judge.judge(name, variant)
            assert v.flagged is False, (name, v.reason)


def test_real_photos_blanked_blurred_are_blocked(judge, photos):
    from PIL import ImageFilter

    for name, img in photos.items():
        black = _jpeg(Image.new("RGB", img.size), 75)
        grey = _jpeg(Image.new("RGB", img.size, (127, 127, 127)), 75)
        blurred = img.filter(ImageFilter.GaussianBlur(16))
        assert judge.judge(name, black).reason.startswith("black"), name
        assert judge.judge(name, grey).reason.startswith("near-uniform"), name
        v = judge.judge(name, blurred)
        assert v.flagged and v.reason.startswith("blurred"), (name, v.reason)


def test_placeholder_matched_by_perceptual_hash(tmp_path, photos):
    from PIL import ImageDraw

    from t2i_eval.judges.blank import dhash, hamming

    card = Image.new("RGB", (512, 512), (235, 235, 235))
    draw = ImageDraw.Draw(card)
    draw.rectangle((96, 200, 416, 312), fill=(200, 40, 40))
    draw.ellipse((236, 120, 276, 160), fill=(60, 60, 60))
    (tmp_path / "ph.yaml").write_text(
        f"version: 1\nhashes:\n  - {{name: card, dhash: '{dhash(card)}'}}\n"
    )
    spec = tmp_path / "blank.yaml"
    spec.write_text(
        "name: blankph\nversion: 1\nkind: blank\nplaceholders: ph.yaml\n"
        "placeholder_max_distance: 6\nblur_max_laplacian_var: 5.0\n"
    )
    judge = build_judge(str(spec))
    served = _jpeg(card.resize((768, 768)), 40)  # rescaled and recompressed by a provider
    assert hamming(dhash(served), dhash(card)) <= 6
    v = judge.judge("r", served)
    assert (
        v.flagged and v.reason.startswith("placeholder") and v.raw["nearest_placeholder"] == "card"
    )
    for name, img in photos.items():
        v = judge.judge(name, img)
        assert v.flagged is False and v.raw["placeholder_distance"] > 6, name
