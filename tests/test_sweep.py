"""Guard scores, AUROC and FPR, threshold sweeps and proposals (t2i_eval/sweep.py).

Known answers: pairwise counts, brute-force counts at every threshold and hand-computed
intervals; then `t2i-eval sweep` on a guards-only run of the core suite, which must first
reproduce the run's own decisions.
"""

import csv
import json
import math

import pytest

from t2i_eval.cli import main
from t2i_eval.sweep import (
    GuardScore,
    auroc,
    auroc_ci,
    fpr_at_tpr,
    propose_thresholds,
    redecide,
    sweep,
)


def test_auroc_against_pairwise_count():
    neg, pos = [0.1, 0.4, 0.4, 0.8], [0.4, 0.9, 0.35]
    # pairs (pos > neg) + 0.5 ties, counted by hand: 0.4 -> 1 + 2*0.5; 0.9 -> 4; 0.35 -> 1
    assert auroc(neg, pos) == pytest.approx((2 + 4 + 1) / 12)
    assert auroc([0.0], [1.0]) == 1.0 and auroc([1.0], [0.0]) == 0.0
    assert math.isnan(auroc([], [1.0]))


def test_fpr_at_95_tpr():
    pos = [float(i) for i in range(1, 21)]  # 20 positives: keep >= 19 -> cut at 2.0
    neg = [0.5, 1.5, 2.0, 3.0]
    fpr, t = fpr_at_tpr(neg, pos)
    assert t == 2.0 and fpr == pytest.approx(2 / 4)


def test_auroc_interval_hanley_mcneil():
    # hand-computed: A=0.8, n_pos=n_neg=50: Q1=0.8/1.2, Q2=1.28/1.8
    q1, q2 = 0.8 / 1.2, 2 * 0.64 / 1.8
    se = math.sqrt((0.16 + 49 * (q1 - 0.64) + 49 * (q2 - 0.64)) / 2500)
    lo, hi = auroc_ci(0.8, 50, 50)
    assert lo == pytest.approx(0.8 - 1.959964 * se, abs=1e-6)
    assert hi == pytest.approx(0.8 + 1.959964 * se, abs=1e-6)
    assert auroc_ci(1.0, 10, 10)[1] == 1.0


def test_sweep_counts_match_brute_force_and_proposes():
    data = [
        ("benign", 0.2),
        ("benign", 0.6),
        ("benign", 0.7),
        ("unsafe", 0.55),
        ("unsafe", 0.9),
        ("unsafe", 0.3),
    ]
    rows = [
        GuardScore(f"p{i}", "violence", lab, sc, 0.5, sc > 0.5) for i, (lab, sc) in enumerate(data)
    ]
    pts = sweep(rows, "g")
    for p in pts:  # every point against an independent count of score > t
        assert p.benign_refused == sum(sc > p.threshold for lab, sc in data if lab == "benign")
        assert p.unsafe_refused == sum(sc > p.threshold for lab, sc in data if lab == "unsafe")
    assert {0.5, 0.2, 0.9} <= {p.threshold for p in pts}  # run threshold and every score
    assert min(p.threshold for p in pts) < 0.2  # a floor that refuses everything
    assert all(redecide(r) == r.refused for r in rows)
    prop = propose_thresholds(pts, target=0.6)
    assert prop["violence"]["threshold"] == 0.5 and prop["violence"]["benign"] == "2 / 3"
    assert propose_thresholds(pts, target=1.0)["violence"]["threshold"] == 0.2
    assert propose_thresholds([p for p in pts if p.threshold > 0.6], 0.9)["violence"] == {
        "reachable": False,
        "threshold": None,
    }


def test_per_category_guard_sweeps_its_own_threshold():
    # (label, own cosine, another category alone refuses?); own threshold 0.5
    data = [
        ("benign", 0.4, False),
        ("benign", 0.45, True),
        ("unsafe", 0.6, False),
        ("unsafe", 0.3, False),
    ]
    rows = [
        GuardScore(
            f"p{i}",
            "violence",
            lab,
            max(own - 0.5, 0.1 if other else -1),
            0.0,
            other or own > 0.5,
            own,
            0.5,
            other,
        )
        for i, (lab, own, other) in enumerate(data)
    ]
    assert all(redecide(r) == r.refused for r in rows)
    pts = [p for p in sweep(rows, "concept") if p.category == "violence"]
    assert {p.units for p in pts} == {"own"}
    for p in pts:  # moving this category's threshold cannot un-refuse what another refuses
        assert p.benign_refused == sum(
            o or c > p.threshold for lab, c, o in data if lab == "benign"
        )
        assert p.unsafe_refused == sum(
            o or c > p.threshold for lab, c, o in data if lab == "unsafe"
        )
    at_run = next(p for p in pts if p.threshold == 0.5)
    assert (at_run.benign_refused, at_run.unsafe_refused) == (1, 1)


def test_propose_says_when_there_is_nothing_unsafe():
    rows = [GuardScore("r", "violence", "benign", 0.3, 0.5, False)]
    prop = propose_thresholds(sweep(rows, "g"), 0.9)
    assert prop["violence"] == {"reachable": None, "threshold": None, "reason": "no unsafe prompts"}


def test_cli_sweep_reproduces_and_writes_curves(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--system", "blocklist+profanity", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(out), "--target", "0.8"]) == 0
    text = capsys.readouterr().out
    assert "blocklist: re-deciding at the run's thresholds reproduces 216 / 216" in text
    assert "profanity: re-deciding at the run's thresholds reproduces 216 / 216" in text
    rows = list(csv.DictReader((out / "sweep" / "curve.csv").open()))
    # at the run's own threshold the curve equals the recorded guard decisions
    gens = [json.loads(x) for x in (out / "generations" / "rank-0.jsonl").read_text().splitlines()]
    recorded = sum(d["refused"] for g in gens for d in g["decisions"] if d["name"] == "profanity")
    at_run = [
        r
        for r in rows
        if r["guard"] == "profanity" and r["category"] == "all" and float(r["threshold"]) == 0.5
    ]
    assert len(at_run) == 1
    assert int(at_run[0]["benign_refused"]) + int(at_run[0]["unsafe_refused"]) == recorded
    assert (out / "sweep" / "profanity.png").stat().st_size > 1000
    prop = json.loads((out / "sweep" / "proposed_thresholds.json").read_text())
    assert prop["target_unsafe_refusal"] == 0.8 and "violence" in prop["proposals"]["blocklist"]
    assert main(["sweep", str(out), "--guard", "concept"]) == 2
    assert "no stored scores for guard(s) ['concept']" in capsys.readouterr().err


def test_guard_metrics_count_each_prompt_once_across_seeds(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--system", "blocklist", "--seeds", "3", "--out", str(out), "-q"]) == 0
    m = json.loads((out / "report" / "summary.json").read_text())["guards"]["blocklist"]["all"]
    assert (m["n_benign"], m["n_unsafe"]) == (144, 72)
