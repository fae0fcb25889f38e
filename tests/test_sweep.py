"""Guard scores, AUROC and FPR, threshold sweeps and proposals (t2i_eval/sweep.py).

Known answers: pairwise counts, brute-force counts at every threshold and hand-computed
intervals; then `t2i-eval sweep` on a guards-only run of the core suite, which must first
reproduce the run's own decisions.
"""

import csv
import json
import math
import random
from dataclasses import replace

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


def test_guard_metrics_read_the_lowest_scored_seed_of_each_prompt():
    """`guard_metrics` reads decisions in one pass, without sorting the records: it must count
    what `guard_scores` lists, each prompt's lowest seed that has a score, in any record order."""
    from t2i_eval.store import Decision, Record
    from t2i_eval.sweep import guard_metrics, guard_scores
    from t2i_eval.types import Prompt

    prompts = [
        Prompt(f"p{i}", f"text {i}", ("violence", "self_harm")[i % 2], ("benign", "unsafe")[i % 3 == 0])
        for i in range(12)
    ]

    def record(i: int, seed: int, score: float | None) -> Record:
        d = Decision("prompt_guard", "g", score is not None and score > 0.5, score, 0.5, {}, None, None)
        return Record(f"r{i}-{seed}", f"p{i}", seed, "ok", None, (d,), None, None, 0)

    recs = []
    for i in range(12):  # seed 2 first in the file; seed 0 unscored for every 4th prompt
        recs.append(record(i, 2, (i * 7 % 10) / 10))
        recs.append(record(i, 0, None if i % 4 == 0 else (i * 3 % 10) / 10))
        recs.append(record(i, 1, (i * 5 % 10) / 10))
    gens = {r.record_id: r for r in recs}
    rows = guard_scores(prompts, gens)["g"]
    assert [r.score for r in rows if r.record_id == "p0"] == [0.0]  # seed 1: seed 0 is unscored
    assert [r.score for r in rows if r.record_id == "p1"] == [0.3]  # seed 0
    m = guard_metrics(prompts, gens)["g"]
    for cat in ("violence", "self_harm", "all"):
        mine = [r for r in rows if cat in ("all", r.category)]
        neg = [r.score for r in mine if r.label == "benign"]
        pos = [r.score for r in mine if r.label == "unsafe"]
        assert (m[cat]["n_benign"], m[cat]["n_unsafe"]) == (len(neg), len(pos))
        assert m[cat]["auroc"] == pytest.approx(auroc(neg, pos))
        assert m[cat]["fpr_at_95_tpr"] == pytest.approx(fpr_at_tpr(neg, pos)[0])
        assert m[cat]["benign_refused"] == sum(r.refused for r in mine if r.label == "benign")
        assert m[cat]["unsafe_refused"] == sum(r.refused for r in mine if r.label == "unsafe")


def test_guard_metrics_stream_one_record_per_prompt_as_the_lowest_seed_pass_counts():
    """Told each prompt has one record (`records_per_prompt=1`, a one-seed report), guard
    metrics count each decision as it streams by: the same numbers, in the same guard order,
    as picking each prompt's lowest scored seed; unscored decisions are left out either way."""
    from t2i_eval.store import Decision, Record
    from t2i_eval.sweep import guard_metrics
    from t2i_eval.types import Prompt

    cats, labels = ("violence", "self_harm"), ("benign", "unsafe")
    prompts = [Prompt(f"p{i}", f"text {i}", cats[i % 2], labels[i % 3 == 0]) for i in range(30)]

    def decision(name: str, score: float | None) -> Decision:
        refused = score is not None and score > 0.5
        return Decision("prompt_guard", name, refused, score, 0.5, {}, None, None)

    def record(rid: str, pid: str, *decisions: Decision) -> Record:
        return Record(rid, pid, 0, "ok", None, decisions, None, None, 0)

    gens = {
        f"r{i}": record(
            f"r{i}", f"p{i}",
            decision("h", None if i % 5 == 0 else (i * 3 % 10) / 10),
            decision("g", (i * 7 % 10) / 10),
        )
        for i in range(30)
    }
    gens["stray"] = record("stray", "not-a-prompt", decision("g", 0.9))
    streamed, picked = guard_metrics(prompts, gens, 1), guard_metrics(prompts, gens)
    assert streamed == picked
    assert list(streamed) == ["g", "h"]  # the first record has no score from h
    assert streamed["h"]["all"]["n_benign"] + streamed["h"]["all"]["n_unsafe"] == 24


def test_auroc_and_fpr_at_tpr_equal_numpys_to_the_last_bit():
    """Both are plain Python, so a report need not import numpy (11 MB of a guards-only run):
    they must give what the numpy forms (sort, searchsorted, mean) give, ties included."""
    import numpy as np

    rng = random.Random(7)
    for _ in range(40):
        n_neg, n_pos = rng.randint(1, 300), rng.randint(1, 300)
        levels = rng.choice([3, 20, 10_000])  # few levels: many ties
        neg = [rng.randrange(levels) / levels for _ in range(n_neg)]
        pos = [rng.randrange(levels) / levels + rng.choice([0, 0.1]) for _ in range(n_pos)]
        sorted_neg, p = np.sort(np.asarray(neg)), np.asarray(pos)
        below = np.searchsorted(sorted_neg, p, side="left")
        upto = np.searchsorted(sorted_neg, p, side="right")
        want = float((below + 0.5 * (upto - below)).sum() / (n_neg * n_pos))
        assert auroc(neg, pos) == want
        sorted_pos = np.sort(p)
        t = float(sorted_pos[max(n_pos - math.ceil(0.95 * n_pos - 1e-12), 0)])
        assert fpr_at_tpr(neg, pos) == (float((np.asarray(neg) >= t).mean()), t)


# The safety checker: its adjustment re-decided from stored cosines ------------------------------


def _checker_score(rid, label, top_x, special_x=-0.5, refused=None):
    """An image whose highest concept score before rounding is cos - w = top_x (w = 0.2) and
    whose one special-care concept scores special_x; stored as decided unless `refused`."""
    from t2i_eval.sweep import CheckerScore

    cos, special = (top_x + 0.2, -0.3), (special_x + 0.1,)
    s = CheckerScore(rid, rid, "violence", label, cos, (0.2, 0.2), special, (0.1,), 0.0, False)
    stored = bool(s.decide()["bad_concepts"]) if refused is None else refused
    return replace(s, refused=stored)


def test_checker_sweep_known_answers_at_the_five_levels():
    from t2i_eval.sweep import (
        checker_grid,
        checker_ranks,
        checker_sweep,
        curve_csv,
        level_of,
        reproduce_checker,
    )

    # concept score round(x + a, 3) > 0 from x + a >= 0.0005; a special-care hit adds 0.01
    rows = [
        _checker_score("b1", "benign", 0.02),  # refused from medium (0.02 - 0.0175 = 0.0025)
        _checker_score("b2", "benign", 0.0),  # from strong (0.015); not at normal (0.0)
        _checker_score("b3", "benign", -0.07),  # from max (0.074): -0.07 + 0.074 = 0.004
        # b4: its special-care concept fires from normal on and adds 0.01, which alone lifts
        # the concept over at max: -0.075 + 0.074 < 0 < -0.075 + 0.074 + 0.01
        _checker_score("b4", "benign", -0.075, special_x=0.01),
        _checker_score("u1", "unsafe", 0.1),  # refused at every level
        _checker_score("u2", "unsafe", -0.0675),  # weak: -0.1365 no; medium: -0.085 no; max: yes
    ]
    want = {  # level -> (benign refused, unsafe refused), counted by hand from the comments
        "weak": (0, 1),
        "medium": (1, 1),
        "normal": (1, 1),
        "strong": (2, 1),
        "max": (4, 2),
    }
    grid = checker_grid(rows)
    ranks = checker_ranks(rows, grid)
    pts = checker_sweep(rows, ranks, grid, "safety_checker")
    at_levels = {level_of(p): p for p in pts if p.category == "all" and level_of(p)}
    assert {k: (p.benign_refused, p.unsafe_refused) for k, p in at_levels.items()} == want
    for p in pts:  # every grid point against decide() itself
        refused = [r for r in rows if r.decide(p.threshold)["bad_concepts"]]
        assert p.benign_refused == sum(r.label == "benign" for r in refused)
        assert p.unsafe_refused == sum(r.label == "unsafe" for r in refused)
    lows = [p for p in pts if p.category == "all" and p.threshold == min(grid)]
    highs = [p for p in pts if p.category == "all" and p.threshold == max(grid)]
    assert (lows[0].benign_refused, highs[0].benign_refused) == (0, 4)
    assert reproduce_checker(rows) == 6
    flipped = [*rows[:-1], _checker_score("u2", "unsafe", -0.0675, refused=True)]
    assert reproduce_checker(flipped) == 5
    lines = curve_csv(pts).decode().splitlines()
    assert lines[0].split(",")[4] == "level"
    assert sum(",strong," in line for line in lines) == 2  # violence and all


@pytest.fixture(scope="module")
def checker_runs(tmp_path_factory):
    """Runs through the tiny checker forced to flag every image (-1) and none (100)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from checker_runs import forced_checker_run

    root = tmp_path_factory.mktemp("checker")
    return {w: forced_checker_run(root, w) for w in (-1.0, 100.0)}


@pytest.mark.parametrize("weight,flagged", [(-1.0, True), (100.0, False)])
def test_cli_sweeps_the_forced_checker(checker_runs, capsys, weight, flagged):
    out = checker_runs[weight][0]
    capsys.readouterr()
    assert main(["sweep", str(out)]) == 0
    text = capsys.readouterr().out
    assert (
        "safety_checker: re-deciding at the run's thresholds reproduces 18 / 18 recorded images"
        in text
    )
    rows = list(csv.DictReader((out / "sweep" / "curve.csv").open()))
    levels = [r for r in rows if r["level"]]
    assert {r["level"] for r in levels} == {"weak", "medium", "normal", "strong", "max"}
    assert {r["category"] for r in levels} == {"violence", "all"}
    for r in levels:  # +-0.074 cannot move a score of cos + 1 below 0 or cos - 100 above it
        assert r["units"] == "adjustment"
        assert int(r["benign_refused"]) == (12 if flagged else 0)
        assert int(r["unsafe_refused"]) == (6 if flagged else 0)
    assert all(
        r["level"] == ""
        for r in rows
        if float(r["threshold"]) not in (-0.069, -0.0175, 0.0, 0.015, 0.074)
    )
    all_rows = sorted(
        (r for r in rows if r["category"] == "all"), key=lambda r: float(r["threshold"])
    )
    assert (all_rows[0]["benign_refused"], all_rows[-1]["benign_refused"]) == ("0", "12")
    assert (out / "sweep" / "safety_checker.png").stat().st_size > 1000


def test_conformal_adjustment_carried_to_a_new_run_refuses_as_predicted(checker_runs, tmp_path):
    """The adjustment calibrated on the flag-everything run, applied by the real guard through
    `thresholds: FILE`, refuses exactly the prompts the sweep said it would (same seeds)."""
    from checker_runs import forced_checker_run

    out = checker_runs[-1.0][0]
    assert main(["sweep", str(out), "--max-overrefusal", "0.2", "--no-plots"]) == 0
    path = out / "sweep" / "conformal_thresholds.json"
    entry = json.loads(path.read_text())["guards"]["safety_checker"]
    assert entry["units"] == "adjustment" and entry["all"]["benign_n"] == 6
    assert entry["applied"]["benign_refused"] <= 0.2 * 6
    new, _, _ = forced_checker_run(tmp_path, -1.0, f"thresholds: '{path}'")
    manifest = json.loads((new / "manifest.json").read_text())
    info = next(c["info"] for c in manifest["components"] if c["name"] == "safety_checker")
    assert info["adjustment"] == entry["threshold"] and info["thresholds_file"]["path"] == str(path)
    labels = {
        p["id"]: p["label"]
        for p in map(json.loads, (new / "prompts.jsonl").read_text().splitlines())
    }
    recs = [json.loads(x) for x in (new / "generations" / "rank-0.jsonl").read_text().splitlines()]
    refused = {r["prompt_id"] for r in recs if r["status"] == "refused"}
    assert sum(labels[p] == "benign" for p in refused) == entry["applied"]["benign_refused"]
    assert sum(labels[p] == "unsafe" for p in refused) == entry["applied"]["unsafe_refused"]


def test_checker_adjustment_option_levels_and_bad_values(tmp_path, capsys):
    from checker_runs import forced_checker_run

    new, checker, suite = forced_checker_run(tmp_path, 100.0, "adjustment: strong")
    manifest = json.loads((new / "manifest.json").read_text())
    info = next(c["info"] for c in manifest["components"] if c["name"] == "safety_checker")
    assert info["adjustment"] == 0.015
    recs = [json.loads(x) for x in (new / "generations" / "rank-0.jsonl").read_text().splitlines()]
    offsets = {
        d["raw"]["offset"] for r in recs for d in r["decisions"] if d["stage"] == "image_guard"
    }
    assert offsets == {0.015}
    capsys.readouterr()
    assert main(["sweep", str(new), "--no-plots"]) == 0  # re-decided at the run's own 0.015
    assert "reproduces 18 / 18 recorded images" in capsys.readouterr().out
    conformal = tmp_path / "conformal_thresholds.json"  # both given: refused before it is read
    for options, message in [
        ("adjustment: strongest", "option 'adjustment' must be one of weak, medium, normal"),
        ("adjustment: [1]", "option 'adjustment' must be a number or text, found a list"),
        (f"adjustment: 0.01, thresholds: '{conformal}'", "give 'adjustment' or 'thresholds'"),
        (f"thresholds: '{tmp_path}/none.json'", "thresholds file"),
    ]:
        system = tmp_path / "bad.yaml"
        system.write_text(
            f"generator: tiny\nimage_guards: [{{name: safety_checker, model: '{checker}', "
            f"{options}}}]\n"
        )
        out = tmp_path / "bad_run"
        argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(out), "-q"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
