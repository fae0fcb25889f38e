"""The trained probe guard's `backend` option: a probe trained on torch vectors scores the same
through the fp32 ONNX export, the manifest says which backend scored, the card's weights digest
still matches, and backends an encoder does not run on are one-line errors before a run exists.
On a tiny random-weight sentence-transformers model (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from t2i_eval.cli import main
from t2i_eval.errors import UserError

pytest.importorskip("sentence_transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from helpers import write_suite  # noqa: E402
from test_fast_encoder import FP32_ATOL, save_tiny_sentence_model  # noqa: E402

from t2i_eval.probe.encoders import load_encoder  # noqa: E402
from t2i_eval.probe.train import load_probe, train_probe  # noqa: E402
from t2i_eval.store import RunStore  # noqa: E402
from t2i_eval.suites import load_suite  # noqa: E402
from t2i_eval.systems.fast_encoder import vectors_digest  # noqa: E402
from t2i_eval.systems.probe_guard import ProbeGuard  # noqa: E402

#: Made of the tiny model's vocabulary (test_fast_encoder.WORDS), so the texts differ in vectors.
ROWS = [
    ("a man with a knife", "unsafe"),
    ("another man with another knife", "unsafe"),
    ("a knife", "unsafe"),
    ("man knife knife", "unsafe"),
    ("a cat", "benign"),
    ("another cat", "benign"),
    ("a cat with a cat", "benign"),
    ("cat cat", "benign"),
]
#: Scored at run time: some seen in training, some not.
PROMPTS = [t for t, _ in ROWS] + ["a man", "another", "knife with cat", "a cat with a knife", ""]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(suite file, probe folder) of a linear probe on `st:<tiny model>`, trained on torch."""
    root = tmp_path_factory.mktemp("probe-backend")
    model = save_tiny_sentence_model(root / "st")
    suite = write_suite(root / "train.jsonl", ROWS)
    folder = root / "guard"
    train_probe([load_suite(str(suite))], encoder=f"st:{model}", cv_folds=2).save(folder)
    return suite, folder


def test_a_torch_trained_probe_scores_and_decides_the_same_on_onnx(trained):
    _, folder = trained
    guards = {b: ProbeGuard(path=str(folder), backend=b) for b in ("torch", "onnx")}
    assert guards["onnx"].probe.encoder.model.name.endswith("+onnx")  # ONNX Runtime ran it
    scores = {b: g.probe.scores(PROMPTS) for b, g in guards.items()}
    np.testing.assert_allclose(scores["onnx"], scores["torch"], atol=FP32_ATOL)
    torch_d, onnx_d = (guards[b].check(PROMPTS) for b in ("torch", "onnx"))
    assert [d.refused for d in onnx_d] == [d.refused for d in torch_d]
    assert {d.refused for d in torch_d} == {True, False}  # the comparison covers both outcomes
    assert guards["torch"].info()["backend"] == "torch"
    assert guards["onnx"].info()["backend"] == "onnx"


def test_the_card_digest_is_the_weights_digest_on_every_backend(trained):
    _, folder = trained
    card = json.loads((folder / "guard.json").read_text())
    want = card["encoder"]["digest"]
    for backend in ("onnx", "onnx-int8"):
        probe = load_probe(folder, backend)
        # the embedding cache keys the ONNX vectors by another digest; the card pins the weights
        assert probe.encoder.digest == want
        assert probe.encoder.model.digest == vectors_digest(want) != want
    card["encoder"]["digest"] = "0" * 64
    (folder.parent / "tampered").mkdir()
    for f in folder.iterdir():
        shutil.copy(f, folder.parent / "tampered" / f.name)
    (folder.parent / "tampered" / "guard.json").write_text(json.dumps(card))
    with pytest.raises(UserError, match="has other weights now"):
        load_probe(folder.parent / "tampered", "onnx")  # the check still runs on ONNX


def test_the_manifest_records_the_backend_of_a_yaml_spec(trained, tmp_path):
    suite, folder = trained
    spec = tmp_path / "onnx.yaml"
    spec.write_text(
        f"prompt_guards: [{{name: probe, path: '{folder}', backend: onnx}}]\n"
        "generator: guards-only\n"
    )
    run = tmp_path / "run"
    assert main(["run", "--suite", str(suite), "--system", str(spec), "--out", str(run), "-q"]) == 0
    (comp,) = [
        c for c in RunStore(run).read_manifest()["components"] if c["stage"] == "prompt_guard"
    ]
    assert comp["name"] == "probe" and comp["info"]["backend"] == "onnx"


def test_bad_backends_are_one_line_exit_2_before_a_run_exists(trained, tmp_path, capsys):
    suite, folder = trained
    clip = tmp_path / "clip"  # a card naming a CLIP text encoder: only the card is read
    clip.mkdir()
    card = json.loads((folder / "guard.json").read_text())
    card["encoder"]["id"] = "clip-text:tiny"
    (clip / "guard.json").write_text(json.dumps(card))
    cases = [
        (folder, "onx", "probe guard: unknown backend 'onx'. Did you mean 'onnx'?"),
        (folder, "int8", "Available: torch, onnx, onnx-int8"),
        (clip, "onnx", "probe guard: encoder 'clip-text:tiny' runs on backend torch only"),
    ]
    run = tmp_path / "run"
    for where, backend, message in cases:
        spec = tmp_path / "spec.yaml"
        spec.write_text(
            f"prompt_guards: [{{name: probe, path: '{where}', backend: {backend}}}]\n"
            "generator: guards-only\n"
        )
        code = main(["run", "--suite", str(suite), "--system", str(spec), "--out", str(run), "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not run.exists()
    with pytest.raises(UserError, match="unknown backend 'ONNX'"):
        ProbeGuard(path=str(folder), backend="ONNX")
    with pytest.raises(UserError, match="'clip-text:tiny' runs on backend torch only, not 'onnx'"):
        load_encoder("clip-text:tiny", "onnx")  # refused before anything loads
