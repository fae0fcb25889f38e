"""The leave-one-source-out matrix (t2i_eval/probe/loso.py, matrix.py).

Metrics against hand-computed answers (AUROC and its DeLong interval, FPR at 95% TPR, refusal
counts); folds that keep twins together; a merged source; counterexamples that would leak a
held-out source dropped; then the whole matrix on three small synthetic sources with a
bag-of-words encoder (fast, deterministic): no held-out source is in its probe's training
set, the held-out probe on a source whose unsafe wording the others lack scores below its
in-distribution number, the files are written and a rerun gives the same numbers.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from t2i_eval.errors import UserError
from t2i_eval.probe.loso import (
    counterexamples_for,
    folds_of,
    leave_one_source_out,
    merge_sources,
    run_matrix,
)
from t2i_eval.probe.matrix import (
    delong_ci,
    heatmap,
    matrix_csv,
    matrix_markdown,
    measure,
    rows_from_json,
    rows_to_json,
)
from t2i_eval.types import Prompt, Suite

#: Source tags (alpha, beta, gamma) are left out on purpose: a word constant in training would
#: be scaled by its zero spread, which says nothing about the matrix.
VOCAB = ("bad", "knife", "cat", "dog", "tree", "house", "red", "blue")


class BagOfWords:
    """A frozen toy encoder: one count per vocabulary word (plus a constant), no model."""

    id = "bow:test"
    digest = "bow0"
    weights = "random"
    dim = len(VOCAB) + 1

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = re.findall(r"[a-z]+", t.lower())
            for j, w in enumerate(VOCAB):
                out[i, j] = words.count(w)
            out[i, -1] = 1.0
        return out


def _suite(name: str, rows: list[tuple[str, str]]) -> Suite:
    prompts = tuple(
        Prompt(f"{name}-{i}", text, "violence", label)  # type: ignore[arg-type]
        for i, (text, label) in enumerate(rows)
    )
    return Suite(name, prompts, source=f"test:{name}")


def _sources() -> list[Suite]:
    """A and B mark unsafe prompts with 'bad'; C marks them with 'knife' only, which A and B
    use in benign prompts: held out, C cannot be learned from A and B."""
    colours = ("red", "blue")
    things = ("cat", "dog", "tree", "house")

    def rows(tag: str, unsafe_word: str, benign_extra: str) -> list[tuple[str, str]]:
        out = []
        for i in range(12):
            thing, colour = things[i % 4], colours[i % 2]
            out.append((f"{tag} {colour} {thing} {benign_extra}".strip(), "benign"))
            out.append((f"{tag} {unsafe_word} {thing} {colours[(i + 1) % 2]}", "unsafe"))
        return out

    return [
        _suite("alpha", rows("alpha", "bad", "knife")),
        _suite("beta", rows("beta", "bad", "")),
        _suite("gamma", rows("gamma", "knife", "")),
    ]


# ---------------------------------------------------------------------------------------------
# metrics against hand-computed answers


def test_delong_interval_against_hand_computation() -> None:
    pos, neg = [0.9, 0.8, 0.4], [0.7, 0.3, 0.2, 0.1]
    # V10 = (1, 1, 3/4), sample variance 1/48; V01 = (2/3, 1, 1, 1), sample variance 1/36;
    # Var = (1/48) / 3 + (1/36) / 4 = 1/72; AUROC = 11/12
    half = 1.959963984540054 * math.sqrt(1 / 72)
    lo, hi = delong_ci(neg, pos)
    assert lo == pytest.approx(11 / 12 - half) and hi == 1.0
    # ties count half: one tie between 0.5 and 0.5. AUROC = (1/2 + 1 + 1 + 1) / 4 = 7/8;
    # V10 = (3/4, 1) and V01 = (3/4, 1), each sample variance 1/32; Var = 1/64 + 1/64 = 1/32
    lo2, hi2 = delong_ci([0.5, 0.1], [0.5, 0.9])
    assert lo2 == pytest.approx(7 / 8 - 1.959963984540054 * math.sqrt(1 / 32))
    assert lo2 == pytest.approx(0.5285, abs=1e-4) and hi2 == 1.0
    assert all(math.isnan(x) for x in delong_ci([0.1], [0.9, 0.8]))  # one benign: undefined


def test_measure_counts_auroc_fpr_and_refusals_by_hand() -> None:
    labels = ["benign"] * 4 + ["unsafe"] * 20
    neg = [0.5, 1.5, 2.0, 3.0]
    pos = [float(i) for i in range(1, 21)]
    # refuse score > 2.5: benign 3.0 (1 of 4); unsafe 3..20 (18 of 20)
    refused = [s > 2.5 for s in neg + pos]
    row = measure(
        source="s",
        guard="g",
        setting="shipped",
        trained_on=(),
        weights="rules",
        labels=labels,
        scores=neg + pos,
        refused=refused,
        seconds=0.048,
        threshold=2.5,
    )
    # pairs unsafe > benign, ties half: per benign 0.5 -> 20, 1.5 -> 19, 2.0 -> 18 + one tie,
    # 3.0 -> 17 + one tie
    assert row.auroc == pytest.approx((20 + 19 + 18.5 + 17.5) / 80)
    # keep >= 19 of 20 unsafe: cut at 2.0 (score >= 2.0) -> benign 2.0 and 3.0 refused
    assert row.fpr_at_95_tpr == pytest.approx(2 / 4)
    assert (row.benign_refused, row.n_benign, row.unsafe_refused, row.n_unsafe) == (1, 4, 18, 20)
    assert row.ms_per_prompt == pytest.approx(2.0)
    assert row.column == "g"


def test_one_label_gives_nan_auroc_and_na_in_tables(tmp_path: Path) -> None:
    row = measure(
        source="only|benign",
        guard="probe",
        setting="held-out",
        trained_on=("a", "=b"),
        weights="random",
        labels=["benign", "benign"],
        scores=[0.1, 0.2],
        refused=[False, True],
        seconds=0.0,
    )
    assert math.isnan(row.auroc) and math.isnan(row.fpr_at_95_tpr)
    md = matrix_markdown([row])
    assert "only\\|benign" in md and "n/a" in md and "(random weights)" in md
    parsed = list(csv.DictReader(matrix_csv([row]).decode().splitlines()))
    assert parsed[0]["auroc"] == "" and parsed[0]["trained_on"] == "a+=b"
    back = rows_from_json(json.loads(json.dumps(rows_to_json([row]))))[0]
    assert back.trained_on == row.trained_on and math.isnan(back.auroc)
    heatmap([row], tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 labels, 1 scores"):
        measure(
            source="s",
            guard="g",
            setting="shipped",
            trained_on=(),
            weights="rules",
            labels=["benign", "unsafe"],
            scores=[0.1],
            refused=[False],
            seconds=0,
        )


# ---------------------------------------------------------------------------------------------
# folds, merged sources, counterexamples


def test_folds_keep_twins_together_are_stratified_and_deterministic() -> None:
    prompts = [
        Prompt(f"p{i}", f"t{i}", "violence", lab, pair_id=f"pair{i // 2}" if i < 20 else None)  # type: ignore[arg-type]
        for i, lab in enumerate(["benign", "unsafe"] * 10 + ["benign"] * 10)
    ]
    a = folds_of(prompts, 5, seed=3)
    assert a == folds_of(prompts, 5, seed=3)
    assert a != folds_of(prompts, 5, seed=4)
    for i in range(0, 20, 2):
        assert a[i] == a[i + 1]  # twins share a fold
    # 10 twin groups and 10 lone benign prompts, each dealt evenly over 5 folds
    assert [a[:20:2].count(f) for f in range(5)] == [2] * 5
    assert [a[20:].count(f) for f in range(5)] == [2] * 5


def test_folds_keep_a_prompt_with_the_prompt_it_was_made_from() -> None:
    prompts = [Prompt(f"p{i}", f"t{i}", "violence", "unsafe") for i in range(6)]
    prompts += [Prompt(f"c{i}", f"c{i}", "violence", "benign", parent_id=f"p{i}") for i in range(6)]
    prompts += [Prompt("cc0", "cc0", "violence", "benign", parent_id="c0")]  # made from a child
    for seed in range(5):
        f = folds_of(prompts, 3, seed)
        assert all(f[i] == f[6 + i] for i in range(6)) and f[-1] == f[0]


def test_merge_sources_keeps_repeats_once_and_refuses_conflicting_ids() -> None:
    a = Suite(
        "a", (Prompt("x", "one", "violence", "benign"), Prompt("y", "two", "violence", "benign"))
    )
    b = Suite(
        "b", (Prompt("x", "one", "violence", "benign"), Prompt("z", "three", "violence", "unsafe"))
    )
    merged = merge_sources("both", [a, b])
    assert merged.name == "both" and [p.id for p in merged.prompts] == ["x", "y", "z"]
    assert [part["name"] for part in merged.provenance["merged_from"]] == ["a", "b"]
    c = Suite("c", (Prompt("x", "other text", "violence", "unsafe"),))
    with pytest.raises(UserError, match="prompt id 'x' means different prompts"):
        merge_sources("both", [a, c])


def test_counterexamples_that_would_leak_a_held_out_source_are_dropped() -> None:
    held = Suite("h", (Prompt("h1", "a knife attack", "violence", "unsafe"),))
    train = Suite(
        "t",
        (
            Prompt("t1", "a gun fight", "violence", "unsafe"),
            Prompt("t2", "a water pistol", "violence", "benign"),
        ),
    )
    cx = [
        Prompt("c1", "a knife on a table", "violence", "benign", parent_id="h1"),  # held-out twin
        Prompt("c2", "a knife attack", "violence", "benign"),  # a held-out text
        Prompt("c3", "a gun shop", "violence", "benign", parent_id="t1"),  # kept
        Prompt("c4", "a water pistol", "violence", "benign", parent_id="t1"),  # a training text
        Prompt("c5", "a nerf gun", "violence", "benign"),  # from a triggers run: kept
        Prompt("c6", "  A Knife   ATTACK", "violence", "benign"),  # the held-out text, restyled
    ]
    kept, dropped = counterexamples_for(cx, [train], held)
    assert [c.id for c in kept] == ["c3", "c5"] and dropped == 4


def test_too_few_or_repeated_sources_are_user_errors(tmp_path: Path) -> None:
    a, b, _ = _sources()
    with pytest.raises(UserError, match="at least 2 sources"):
        run_matrix([a], encoder=BagOfWords(), baselines=(), progress=False)
    with pytest.raises(UserError, match="more than once"):
        run_matrix([a, a], encoder=BagOfWords(), baselines=(), progress=False)


# ---------------------------------------------------------------------------------------------
# the matrix end to end on synthetic sources


def _counterexamples() -> list[Prompt]:
    """One benign twin made from an alpha prompt, one from a gamma prompt."""
    return [
        Prompt("cx-a", "a blue house", "violence", "benign", parent_id="alpha-1"),
        Prompt("cx-g", "a red tree", "violence", "benign", parent_id="gamma-1"),
    ]


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loso") / "matrix"
    got = leave_one_source_out(
        _sources(),
        encoder=BagOfWords(),  # type: ignore[arg-type]
        out=out,
        counterexamples=_counterexamples(),
        folds=3,
        baselines=("blocklist",),
        progress=False,
    )
    assert got == out
    return out


def test_matrix_files_are_written(matrix_dir: Path) -> None:
    names = {p.name for p in matrix_dir.iterdir()}
    assert {"matrix.csv", "matrix.md", "matrix.json", "heatmap.png", "probes"} <= names
    assert (matrix_dir / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((matrix_dir / "matrix.csv").read_text().splitlines()))
    # 3 sources x (held-out, in-distribution, blocklist)
    assert len(rows) == 9
    assert {r["setting"] for r in rows} == {"held-out", "in-distribution", "shipped"}
    md = (matrix_dir / "matrix.md").read_text()
    assert "| gamma | probe (random weights) | held-out | alpha, beta |" in md
    assert "random weights" in md and "DeLong" in md


def test_no_held_out_source_is_in_its_training_set(matrix_dir: Path) -> None:
    for name in ("alpha", "beta", "gamma"):
        card = json.loads((matrix_dir / "probes" / name / "guard.json").read_text())
        trained = [t["source"] for t in card["train"]]
        assert name not in trained and len(trained) == 2
    setup = json.loads((matrix_dir / "matrix.json").read_text())["setup"]
    assert setup["held_out"]["gamma"]["trained_on"] == ["alpha", "beta"]
    # a counterexample made from a held-out prompt never trains the probe that holds it out
    used = {
        n: (h["counterexamples_used"], h["counterexamples_dropped"])
        for n, h in setup["held_out"].items()
    }
    assert used == {"alpha": (1, 1), "beta": (2, 0), "gamma": (1, 1)}
    gamma = json.loads((matrix_dir / "probes" / "gamma" / "guard.json").read_text())
    assert gamma["counterexamples"]["added"] == 1


def test_held_out_falls_below_in_distribution_where_wording_differs(matrix_dir: Path) -> None:
    rows = {
        (r["source"], r["guard"], r["setting"]): r
        for r in json.loads((matrix_dir / "matrix.json").read_text())["rows"]
    }
    held, indist = rows[("gamma", "probe", "held-out")], rows[("gamma", "probe", "in-distribution")]
    # in gamma only 'knife' marks unsafe prompts; alpha uses it in benign ones
    assert indist["auroc"] == 1.0
    assert held["auroc"] < 0.5
    # beta is learnable from alpha ('bad' marks unsafe in both)
    assert rows[("beta", "probe", "held-out")]["auroc"] == 1.0
    # the held-out threshold was chosen on alpha + beta and applied unchanged
    assert (
        held["threshold"]
        == json.loads((matrix_dir / "probes" / "gamma" / "guard.json").read_text())["threshold"][
            "value"
        ]
    )
    assert rows[("gamma", "blocklist", "shipped")]["trained_on"] == []


def test_matrix_is_deterministic(matrix_dir: Path, tmp_path: Path) -> None:
    again = leave_one_source_out(
        _sources(),
        encoder=BagOfWords(),  # type: ignore[arg-type]
        out=tmp_path / "again",
        counterexamples=_counterexamples(),
        folds=3,
        baselines=("blocklist",),
        progress=False,
    )

    def numbers(folder: Path) -> list[dict]:
        rows = json.loads((folder / "matrix.json").read_text())["rows"]
        return [{k: v for k, v in r.items() if k != "ms_per_prompt"} for r in rows]

    assert numbers(again) == numbers(matrix_dir)
    for name in ("alpha", "beta", "gamma"):
        a = (again / "probes" / name / "head.safetensors").read_bytes()
        assert a == (matrix_dir / "probes" / name / "head.safetensors").read_bytes()


def test_out_folder_with_foreign_files_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files this output does not own"):
        leave_one_source_out(
            _sources(),
            encoder=BagOfWords(),
            out=out,
            folds=3,
            baselines=(),
            progress=False,  # type: ignore[arg-type]
        )
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_joins_the_files_of_one_source_and_holds_it_out_whole(tmp_path: Path) -> None:
    """`train-guard --leave-one-source-out --train alpha=A+B ...`: the two files of alpha are one
    source in the matrix, and the probe that holds alpha out trained on neither file."""
    from t2i_eval.cli import main

    def write(path: Path, suite: Suite) -> str:
        rows = [{"id": p.id, "prompt": p.text, "category": p.category, "label": p.label}
                for p in suite.prompts]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    alpha, beta, gamma = _sources()
    half = len(alpha.prompts) // 2
    a1 = write(tmp_path / "alpha1.jsonl", Suite("alpha1", alpha.prompts[:half]))
    a2 = write(tmp_path / "alpha2.jsonl", Suite("alpha2", alpha.prompts[half:]))
    refs = [f"alpha={a1}+{a2}", write(tmp_path / "beta.jsonl", beta),
            write(tmp_path / "gamma.jsonl", gamma)]
    out = tmp_path / "matrix"
    argv = ["train-guard", "--leave-one-source-out", "--encoder", "clip-text:tiny",
            "--cv-folds", "2", "--out", str(out), "-q"]
    for ref in refs:
        argv += ["--train", ref]
    assert main(argv) == 0
    setup = json.loads((out / "matrix.json").read_text())["setup"]
    assert sorted(setup["held_out"]) == ["alpha", "beta", "gamma"]
    assert setup["held_out"]["alpha"]["trained_on"] == ["beta", "gamma"]
    card = json.loads((out / "probes" / "beta" / "guard.json").read_text())
    alpha_row = next(t for t in card["train"] if t["source"] == "alpha")
    assert alpha_row["n"] == len(alpha.prompts)
    assert main([*argv[:-3], "--train", "x=", "--out", str(tmp_path / "m2"), "-q"]) == 2
