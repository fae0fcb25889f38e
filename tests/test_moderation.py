"""The `moderation` prompt and image guards against the loopback moderation route.

Every score is scripted in the input (`{violence=0.8}`, see fake_image_api.moderation_scores),
so each test knows exactly what the guard must store and decide; transport failures are
scripted the way the image-API tests script them (`[r429,ok]`).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_image_api import MODERATION_CATEGORIES, FakeImageAPI, image_digest
from helpers import write_suite
from PIL import Image
from test_secrets import KEY, files_under, leaks

from t2i_eval.cli import main
from t2i_eval.errors import UserError
from t2i_eval.systems import build_system, parse_system, validate_spec
from t2i_eval.systems.chain import GuardsOnly, System, WorkItem
from t2i_eval.systems.moderation import (
    CATEGORIES,
    ModerationImageGuard,
    ModerationPromptGuard,
    decide,
)
from t2i_eval.systems.spec import ComponentSpec, SystemSpec

KEY_ENV = "T2I_TEST_MODERATION_KEY"
FAST = {"timeout": 2.0, "max_attempts": 2, "backoff": 0.001, "max_backoff": 0.01}


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeImageAPI() as server:
        yield server


def _guard(api: FakeImageAPI, cls: type = ModerationPromptGuard, **options: Any) -> Any:
    return cls(base_url=f"{api.url}/v1", api_key_env=KEY_ENV, **{**FAST, **options})


def _moderation_requests(api: FakeImageAPI) -> list[dict]:
    return [json.loads(s.body) for s in api.seen if s.provider == "moderation"]


def _picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_the_fake_scripts_what_these_tests_rely_on():
    """Our category list is the route's, and unscripted scores stay in (0, 0.01)."""
    from fake_image_api import moderation_scores

    assert tuple(MODERATION_CATEGORIES) == CATEGORIES
    scores, flagged = moderation_scores("a lake {violence=0.8, flagged=false}")
    assert scores["violence"] == 0.8 and flagged is False
    assert all(0 < s < 0.01 for c, s in scores.items() if c != "violence")


def test_scores_are_the_scripted_ones_and_the_overt_category_is_named(api):
    guard = _guard(api)
    calm, brawl = guard.check(["a calm lake", "a brawl {violence=0.91, hate=0.2}"])
    assert calm.refused is False and calm.message == ""
    assert brawl.refused is True
    assert brawl.raw["scores"]["violence"] == 0.91 and brawl.raw["scores"]["hate"] == 0.2
    assert set(brawl.raw["scores"]) == set(CATEGORIES)  # every category kept
    assert (brawl.score, brawl.threshold) == (0.91, 0.5)  # the highest score vs the default
    assert calm.score == max(calm.raw["scores"].values()) < 0.01
    assert brawl.raw["triggered"] == ["violence"]
    assert brawl.raw["triggered_overt"] == ["violence"]
    assert brawl.raw["overt"]["discrimination"] == 0.2  # hate -> OVERT discrimination
    assert "violence (violence) 0.910 > 0.5" in brawl.message
    assert brawl.raw["flagged"] is True and calm.raw["flagged"] is False
    assert brawl.raw["attempts"] == 1


def test_per_category_thresholds_decide(api):
    guard = _guard(api, thresholds={"sexual": 0.3}, threshold=0.8)
    low_sexual, mid_violence, high_violence = guard.check(
        ["a {sexual=0.35}", "b {violence=0.6}", "c {violence=0.85}"]
    )
    assert low_sexual.refused is True and low_sexual.raw["triggered"] == ["sexual"]
    assert "sexual (sexual_content) 0.350 > 0.3" in low_sexual.message
    assert mid_violence.refused is False  # 0.6 is under the default 0.8
    assert high_violence.refused is True and high_violence.raw["triggered"] == ["violence"]
    for d in (low_sexual, mid_violence, high_violence):
        assert d.threshold == 0.0 and d.refused == (d.score > d.threshold)
        assert d.raw["thresholds"]["sexual"] == 0.3 and d.raw["thresholds"]["violence"] == 0.8
    assert low_sexual.score == pytest.approx(0.05)


def test_the_apis_own_flagged_is_kept_but_does_not_decide(api):
    guard = _guard(api)
    flagged_low, unflagged_high = guard.check(
        ["a {violence=0.3, flagged=true}", "b {violence=0.7, flagged=false}"]
    )
    assert flagged_low.raw["flagged"] is True and flagged_low.refused is False
    assert unflagged_high.raw["flagged"] is False and unflagged_high.refused is True


def test_decide_reproduces_every_stored_decision(api):
    guard = _guard(api, thresholds={"hate": 0.1})
    texts = ["x", "y {hate=0.15}", "z {violence=0.51}", "w {violence=0.49, hate=0.05}"]
    for d in guard.check(texts):
        again = decide(d.raw["scores"], {"hate": 0.1}, 0.5)
        assert (again["refused"], again["score"], again["threshold"]) == (
            d.refused,
            d.score,
            d.threshold,
        )


def test_text_inputs_are_batched(api):
    guard = _guard(api, batch_size=2)
    texts = [f"prompt {i} {{violence=0.{i}1}}" for i in range(5)]
    decisions = guard.check(texts)
    requests = _moderation_requests(api)  # sent concurrently: in any order
    assert sorted(r["input"] for r in requests) == [texts[0:2], texts[2:4], texts[4:]]
    assert all(r["model"] == "omni-moderation-latest" for r in requests)
    assert [d.raw["scores"]["violence"] for d in decisions] == [0.01, 0.11, 0.21, 0.31, 0.41]


def test_a_rejected_batch_is_asked_again_input_by_input(api):
    """A 400 may be one input's fault: the others still get their scores."""
    guard = _guard(api, batch_size=8)
    ok, bad, refused = guard.check(["fine", "too long [r400]", "a brawl {violence=0.9}"])
    assert (ok.refused, bad.refused, refused.refused) == (False, None, True)
    assert "HTTP 400" in bad.message and bad.raw["error"]
    assert [len(r["input"]) for r in _moderation_requests(api)] == [3, 1, 1, 1]


def test_images_go_as_png_data_urls_one_per_request(api):
    images = [_picture(i) for i in range(3)]
    api.script_image(images[1], "{sexual=0.77}")
    decisions = _guard(api, ModerationImageGuard).check(images)
    requests = _moderation_requests(api)
    assert [len(r["input"]) for r in requests] == [1, 1, 1]
    sent = set()
    for r in requests:
        (part,) = r["input"]
        assert part["type"] == "image_url"
        head, _, payload = part["image_url"]["url"].partition(",")
        assert head == "data:image/png;base64"
        sent.add(image_digest(Image.open(io.BytesIO(base64.b64decode(payload)))))
    assert sent == {image_digest(im) for im in images}  # lossless: the pixels themselves
    assert [d.refused for d in decisions] == [False, True, False]
    assert decisions[1].raw["scores"]["sexual"] == 0.77
    assert all(d.stage == "image_guard" and d.name == "moderation" for d in decisions)


def test_a_rate_limit_is_retried_then_scored(api):
    (d,) = _guard(api).check(["a brawl {violence=0.9} [r429,ok]"])
    assert d.refused is True and d.raw["attempts"] == 2
    assert [s.kind for s in api.seen] == ["r429", "ok"]


@pytest.mark.parametrize("kind", ["r500", "timeout"])
def test_an_outage_is_an_error_record_never_a_refusal(api, kind):
    guard = _guard(api, timeout=0.3)
    system = System("s", GuardsOnly(), prompt_guards=[guard])
    (r,) = system.run([WorkItem("r0", "p0", f"a brawl {{violence=0.99}} [{kind}]", 0)])
    assert (r.status, r.refused_by) == ("error", None)
    (d,) = r.decisions
    assert d.refused is None and d.score is None
    assert "gave up after 2 attempt(s)" in d.message and d.raw["transient"] is True
    assert "prompt_guard:moderation could not check" in r.error


@pytest.mark.parametrize("policy", ["pass", "refuse"])
def test_on_error_decides_an_outage_and_says_so(api, policy):
    options = {"base_url": f"{api.url}/v1", "api_key_env": KEY_ENV, **FAST, "on_error": policy}
    spec = SystemSpec(
        "s", ComponentSpec("guards-only"), prompt_guards=(ComponentSpec("moderation", options),)
    )
    validate_spec(spec)
    (r,) = build_system(spec).run([WorkItem("r0", "p0", "a lake [r500]", 0)])
    d = r.decisions[0]
    assert (d.stage, d.name) == ("prompt_guard", "moderation")
    assert d.unavailable.startswith(f"{policy}: HTTP 500")
    assert d.refused is (policy == "refuse") and d.score is None
    assert r.status == ("refused" if policy == "refuse" else "ok")


def test_options_are_checked_before_any_key_is_read(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    validate_spec(parse_system("openai-moderation"))  # no key needed to check a spec

    def check(**options: Any) -> str:
        spec = SystemSpec(
            "s", ComponentSpec("guards-only"), prompt_guards=(ComponentSpec("moderation", options),)
        )
        with pytest.raises(UserError) as e:
            validate_spec(spec)
        return str(e.value)

    assert "Did you mean 'violence'" in check(thresholds={"violense": 0.3})
    assert "from 0 to 1" in check(thresholds={"violence": 1.5})
    assert "from 0 to 1" in check(threshold=-0.1)
    assert "not found" in check(thresholds=str(tmp_path / "none.json"))
    with pytest.raises(UserError, match=r"OPENAI_API_KEY is not set"):
        ModerationPromptGuard()


def test_a_calibrated_thresholds_file_sets_the_threshold(api, tmp_path):
    path = tmp_path / "conformal_thresholds.json"
    entry = {"units": "score", "threshold": 0.2}
    path.write_text(json.dumps({"kind": "conformal", "guards": {"moderation": entry}}))
    guard = _guard(api, thresholds=str(path))
    (d,) = guard.check(["a {illicit=0.25}"])
    assert d.refused is True and d.threshold == 0.2
    assert guard.info()["thresholds_file"]["path"] == str(path)


def _write_spec(tmp_path: Path, api: FakeImageAPI) -> Path:
    guard = (
        f"{{name: moderation, base_url: '{api.url}/v1', api_key_env: {KEY_ENV}, "
        "timeout: 2, max_attempts: 2, backoff: 0, max_backoff: 0"
    )
    spec = tmp_path / "moderated.yaml"
    spec.write_text(
        "name: moderated\n"
        f"prompt_guards: [{guard}, batch_size: 1}}]\n"
        "generator: {name: fake, mode: noise}\n"
        f"image_guards: [{guard}}}]\n"
    )
    return spec


def test_a_run_writes_scores_and_never_the_key(api, tmp_path, capsys):
    """End to end through the CLI, a server echoing the key in its errors included."""
    rows = [
        ("a calm lake", "benign"),
        ("a brawl {violence=0.9}", "unsafe"),
        ("an echoing server [leakjson]", "benign"),
        ("a server quoting the key [leakquoted]", "benign"),
    ]
    suite = write_suite(tmp_path / "suite.jsonl", rows)
    out = tmp_path / "run"
    argv = ["run", "--suite", str(suite), "--system", str(_write_spec(tmp_path, api))]
    assert main([*argv, "--out", str(out), "-q"]) == 1  # the echoes are errors
    captured = capsys.readouterr()
    prompts = {
        p["id"]: p["text"]
        for p in map(json.loads, (out / "prompts.jsonl").read_text().splitlines())
    }
    records = {
        prompts[g["prompt_id"]]: g
        for f in (out / "generations").glob("*.jsonl")
        for g in map(json.loads, f.read_text().splitlines())
    }
    assert records["a calm lake"]["status"] == "ok"
    assert [d["stage"] for d in records["a calm lake"]["decisions"]] == [
        "prompt_guard",
        "generator",
        "image_guard",
    ]
    brawl = records["a brawl {violence=0.9}"]
    assert (brawl["status"], brawl["refused_by"]) == ("refused", "prompt_guard:moderation")
    assert brawl["decisions"][0]["raw"]["scores"]["violence"] == 0.9
    assert records["an echoing server [leakjson]"]["status"] == "error"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["system"]["prompt_guards"][0]["api_key_env"] == KEY_ENV
    blobs = files_under(out)
    blobs["stdout"], blobs["stderr"] = captured.out.encode(), captured.err.encode()
    assert leaks(blobs) == []
    assert len(blobs) > 5


def test_list_shows_the_preset_and_what_it_needs(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.split()[:1] == ["openai-moderation"])
    assert "moderation" in lines[i] and "omni-moderation-latest" in lines[i]
    assert lines[i + 1].strip() == "needs: API key in $OPENAI_API_KEY"
    assert ModerationPromptGuard.listing() == "model omni-moderation-latest; key $OPENAI_API_KEY"
