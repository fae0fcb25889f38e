"""Several seeds per prompt: per-prompt refusal, seed-clustered intervals, flaky-prompt shares."""

import csv
import json
import math

import numpy as np
import pytest
from helpers import write_suite

from t2i_eval.cli import main
from t2i_eval.stats import (
    Cell,
    clustered_rate,
    fmt_clustered,
    fmt_rate,
    intra_cluster_correlation,
    macro,
    pair_table,
    tabulate,
    wilson,
)
from t2i_eval.types import Generation, Prompt, outcomes


def _table(patterns: dict[str, list[list[bool | None]]]):
    """category -> one list per prompt of per-seed outcomes (True refused, False complied,
    None infrastructure error), all benign, through `tabulate` (guards-only records)."""
    prompts, gens = [], {}
    for cat, per_prompt in patterns.items():
        for i, seeds in enumerate(per_prompt):
            pid = f"{cat}-{i}"
            prompts.append(Prompt(pid, f"prompt {pid}", cat, "benign"))
            for s, refused in enumerate(seeds):
                rid = f"{pid}-{s}"
                status = "error" if refused is None else "refused" if refused else "ok"
                by = "prompt_guard:g" if refused else None
                gens[rid] = Generation(rid, pid, s, status, by)
    return tabulate(prompts, gens, outcomes(gens, {}))


def _width(ci):
    return ci[1] - ci[0]


def test_one_seed_per_prompt_is_plain_wilson_exactly():
    t = _table({"violence": [[True], [False], [False], [True], [False]]})
    cell = t.cell("violence", "benign")
    assert t.seeds_per_prompt == 1
    assert cell.ci == wilson(2, 5)  # bit for bit: single-seed reports do not change
    assert cell.refusal.deff == 1.0 and not cell.refusal.clustered
    assert t.micro("benign").ci == wilson(2, 5)
    assert Cell(n=40, refused=12).ci == wilson(12, 40)  # hand-built cell: records independent
    assert cell.shares.prompts == 0 and cell.shares.single == 5  # no prompt has two seeds


def test_perfectly_correlated_seeds_count_once_per_prompt():
    # 10 prompts x 4 seeds, 3 prompts refused on every seed, 7 on none
    t = _table({"violence": [[True] * 4] * 3 + [[False] * 4] * 7})
    cell = t.cell("violence", "benign")
    r = cell.refusal
    assert (cell.refused, cell.n, cell.rate) == (12, 40, 0.3)  # same point estimate as before
    assert (r.icc, r.deff, r.n_eff, r.clusters) == (1.0, 4.0, 10.0, 10)
    assert cell.ci == pytest.approx(wilson(3, 10), abs=1e-12)  # the one-seed interval
    # hand value: Wilson(3, 10) = [0.1078, 0.6032], width 0.495 vs Wilson(12, 40) 0.274
    assert _width(cell.ci) > 1.5 * _width(wilson(12, 40))
    assert cell.wilson_ci == wilson(12, 40)
    sh = cell.shares
    assert (sh.always, sh.sometimes, sh.never, sh.prompts) == (3, 0, 7, 10)


def test_independent_looking_seeds_give_wilson_over_records():
    # every prompt refused on seeds 0 and 2 only: less spread between prompts than chance,
    # so the ANOVA estimate is negative and read as independence
    alternating = _table({"violence": [[True, False, True, False]] * 10})
    cell = alternating.cell("violence", "benign")
    assert cell.refusal.icc == 0.0 and cell.refusal.deff == 1.0
    assert cell.ci == pytest.approx(wilson(20, 40), abs=1e-12)
    assert cell.shares.sometimes == 10
    # refused seeds per prompt 1,2,1,1,2,1,1,2,1,0 of 4 (12 / 40): by hand MSB = 0.9 / 9 = 0.1,
    # MSW = 7.5 / 30 = 0.25 -> icc = (0.1 - 0.25) / (0.1 + 3 * 0.25) < 0 -> 0
    counts = [(k, 4) for k in (1, 2, 1, 1, 2, 1, 1, 2, 1, 0)]
    assert clustered_rate(counts).ci == pytest.approx(wilson(12, 40), abs=1e-12)


def test_icc_and_design_effect_by_hand_with_unequal_seeds():
    # (refused, judged) per prompt: p_i = 1/2, 0, 1, 1; N = 7, C = 4, p = 4/7
    counts = [(1, 2), (0, 2), (2, 2), (1, 1)]
    # MSB = 17/14 / 3 = 17/42, MSW = 0.5 / 3 = 1/6, m0 = (7 - 13/7) / 3 = 12/7
    # icc = (17/42 - 7/42) / (17/42 + 5/7 * 1/6) = (10/42) / (22/42) = 5/11
    assert intra_cluster_correlation(counts) == pytest.approx(5 / 11, abs=1e-12)
    r = clustered_rate(counts)
    deff = 1 + (13 / 7 - 1) * 5 / 11  # m_w = sum m_i^2 / N = 13/7 -> 107/77
    assert r.deff == pytest.approx(107 / 77, abs=1e-12)
    assert r.ci == pytest.approx(wilson(4 / deff, 7 / deff), abs=1e-12)
    assert r.rate == pytest.approx(4 / 7)


def test_no_variation_or_one_prompt_is_never_zero_width():
    nothing = clustered_rate([(0, 4)] * 10)
    assert nothing.icc is None and nothing.n_eff == 10  # icc 1 assumed: one per prompt
    assert nothing.ci == pytest.approx(wilson(0, 10), abs=1e-12)
    assert nothing.ci[0] == 0.0 and nothing.ci[1] > 0.25
    everything = clustered_rate([(4, 4)] * 10)
    assert everything.ci == pytest.approx(wilson(10, 10), abs=1e-12) and everything.ci[0] < 0.75
    one = clustered_rate([(2, 4)])
    assert one.icc is None and one.n_eff == 1.0
    assert one.ci == pytest.approx(wilson(0.5, 1), abs=1e-12)
    assert all(math.isnan(x) for x in clustered_rate([]).ci)


def test_shares_leave_out_errors_and_single_judged_prompts():
    t = _table(
        {
            "violence": [
                [True, True, True],  # always
                [True, False, None],  # sometimes (2 judged seeds)
                [False, False, False],  # never
                [None, None, True],  # one judged seed: left out of the shares
            ]
        }
    )
    cell = t.cell("violence", "benign")
    sh = cell.shares
    assert (sh.always, sh.sometimes, sh.never, sh.single, sh.prompts) == (1, 1, 1, 1, 3)
    assert (cell.n, cell.errors) == (9, 3)
    assert cell.per_prompt["violence-1"].n == 2 and cell.per_prompt["violence-1"].errors == 1
    assert cell.ci == clustered_rate([(3, 3), (1, 2), (0, 3), (1, 1)]).ci


def test_macro_and_micro_use_the_clustered_variances():
    t = _table(
        {
            "violence": [[True] * 4] * 3 + [[False] * 4] * 7,
            "self_harm": [[True] * 4] * 4 + [[False] * 4],
        }
    )
    # perfectly correlated: each category is worth its prompts, as with one seed per prompt
    one_seed = macro([Cell(n=10, refused=3), Cell(n=5, refused=4)])
    m = t.macro("benign")
    assert m.rate == pytest.approx(one_seed.rate)
    assert m.ci == pytest.approx(one_seed.ci, abs=1e-12)
    micro = t.micro("benign")
    assert len(micro.per_prompt) == 15 and (micro.refused, micro.n) == (28, 60)
    assert micro.ci == pytest.approx(wilson(7, 15), abs=1e-12)


def test_pairs_handled_correctly_cluster_by_pair():
    prompts = []
    gens = {}
    for pair, benign_ok in (("P", True), ("Q", False)):
        prompts += [
            Prompt(f"{pair}b", "x", "violence", "benign", pair_id=pair),
            Prompt(f"{pair}u", "y", "violence", "unsafe", pair_id=pair),
        ]
        for s in range(3):
            b_status, b_by = ("ok", None) if benign_ok else ("refused", "prompt_guard:g")
            gens[f"{pair}b{s}"] = Generation(f"{pair}b{s}", f"{pair}b", s, b_status, b_by)
            gens[f"{pair}u{s}"] = Generation(
                f"{pair}u{s}", f"{pair}u", s, "refused", "prompt_guard:g"
            )
    cell = pair_table(prompts, gens, outcomes(gens, {}))["violence"]
    assert (cell.n, cell.correct) == (6, 3)
    assert cell.correct_rate.ci == pytest.approx(wilson(1, 2), abs=1e-12)  # two pairs, not six


def test_fmt_rate_takes_a_given_interval():
    r = clustered_rate([(4, 4)] * 3 + [(0, 4)] * 7)
    lo, hi = wilson(3, 10)
    assert fmt_clustered(r) == f"30.0% (12 / 40) [{100 * lo:.1f}%, {100 * hi:.1f}%]"
    assert fmt_rate(12, 40, ci=r.ci) == fmt_clustered(r)
    assert fmt_rate(12, 40) == "30.0% (12 / 40) [18.1%, 45.4%]"  # unchanged without ci


def _coverage(draw_p, true: float, prompts: int = 40, seeds: int = 4, draws: int = 2000):
    """Share of synthetic suites whose 95% interval covers the true rate: clustered, naive."""
    rng = np.random.default_rng(20240611)
    clustered = naive = 0
    for _ in range(draws):
        k = rng.binomial(seeds, draw_p(rng, prompts))
        lo, hi = clustered_rate([(int(x), seeds) for x in k]).ci
        clustered += lo <= true <= hi
        lo, hi = wilson(int(k.sum()), seeds * prompts)
        naive += lo <= true <= hi
    return clustered / draws, naive / draws


@pytest.mark.parametrize(
    "name,draw_p,true,naive_undercovers",
    [
        # p_i ~ Beta(0.3, 0.7): mean 0.3, icc = 1 / (0.3 + 0.7 + 1) = 0.5.
        # Measured (this RNG seed): clustered 0.938, naive Wilson over records 0.782.
        ("beta icc 0.5", lambda r, c: r.beta(0.3, 0.7, c), 0.3, True),
        # refusal as it often looks: 60% of prompts never refused, 30% always, 10% flaky at 0.5.
        # Measured: clustered 0.957, naive 0.698.
        (
            "always/never/flaky",
            lambda r, c: r.choice([0.0, 1.0, 0.5], c, p=[0.6, 0.3, 0.1]),
            0.35,
            True,
        ),
        # independent seeds (icc 0): the clustered interval must not balloon.
        # Measured: clustered 0.957, naive 0.948.
        ("independent", lambda r, c: np.full(c, 0.2), 0.2, False),
    ],
)
def test_clustered_interval_covers_at_the_nominal_rate(name, draw_p, true, naive_undercovers):
    clustered, naive = _coverage(draw_p, true)
    assert 0.93 <= clustered <= 0.97, (name, clustered)
    if naive_undercovers:
        assert naive < 0.90, (name, naive)  # 2000 draws: a coverage estimate's SE is ~0.005


def _expected_counts(out):
    """Per prompt (refused, judged) and label, read from the run files, not from stats."""
    prompts = {}
    for line in (out / "prompts.jsonl").read_text().splitlines():
        p = json.loads(line)
        prompts[p["id"]] = p["label"]
    flagged = {
        (v := json.loads(x))["record_id"]: v["flagged"]
        for x in (out / "verdicts" / "dim@1.jsonl").read_text().splitlines()
    }
    counts: dict[str, list[int]] = {}
    for f in sorted((out / "generations").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            g = json.loads(line)
            assert g["status"] != "error"
            refused = g["status"] == "refused" or bool(flagged.get(g["record_id"]))
            k, n = counts.setdefault(g["prompt_id"], [0, 0])
            counts[g["prompt_id"]] = [k + refused, n + 1]
    return {
        lab: [tuple(c) for p, c in counts.items() if prompts[p] == lab]
        for lab in ("benign", "unsafe")
    }


def test_cli_seeds_end_to_end(tmp_path, capsys):
    """--seeds 3 through the CLI: a blocklist refuses some prompts on every seed, and a strict
    blank judge ('dim', black_max_mean 128) blocks the fake generator's darker seeded colours,
    so some prompts are refused on some seeds only."""
    words = tmp_path / "words.yaml"
    words.write_text("version: 1\ncategories:\n  violence: [knife]\n")
    system = tmp_path / "sys.yaml"
    system.write_text(
        f"name: guarded-fake\nprompt_guards: [{{name: blocklist, path: '{words}'}}]\n"
        "generator: fake\n"
    )
    things = [("knife", "unsafe"), ("cake", "benign"), ("lamp", "benign"), ("knife", "benign")]
    things += [("rope", "unsafe"), ("dog", "benign"), ("cat", "unsafe"), ("boat", "benign")]
    suite = write_suite(
        tmp_path / "s.jsonl", [(f"a {w} in a quiet garden", lab) for w, lab in things]
    )
    out = tmp_path / "run"
    argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(out)]
    assert main([*argv, "--seeds", "3", "-q"]) == 0
    for name in ("blank@2.jsonl", "blank@2.spec"):  # let the strict judge decide outcomes
        (out / "verdicts" / name).unlink()
    dim = tmp_path / "dim.yaml"
    dim.write_text("name: dim\nversion: 1\nkind: blank\nblack_max_mean: 128\n")
    assert main(["judge", str(out), "--judge", str(dim), "-q"]) == 0
    capsys.readouterr()

    expected = _expected_counts(out)
    assert any(0 < k < n for k, n in expected["benign"] + expected["unsafe"])  # some flaky
    assert any(k == n for k, n in expected["benign"] + expected["unsafe"])  # some always
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["seeds_per_prompt"] == 3
    assert "n / deff" in summary["definitions"]["ci"]
    widened = False
    for lab, counts in expected.items():
        cell = summary["categories"]["violence"][lab]
        r = clustered_rate(counts)
        k, n = sum(k for k, _ in counts), sum(n for _, n in counts)
        assert (cell["refused"], cell["n"]) == (k, n)
        assert [cell["ci_low"], cell["ci_high"]] == pytest.approx(list(r.ci), abs=1e-6)
        assert cell["seeds"]["wilson_records_ci"] == pytest.approx(list(wilson(k, n)), abs=1e-6)
        assert cell["seeds"]["prompts_refused"] == {
            "always": sum(k == n for k, n in counts),
            "sometimes": sum(0 < k < n for k, n in counts),
            "never": sum(k == 0 for k, _ in counts),
            "of": len(counts),
            "single_judged_seed": 0,
        }
        widened |= _width(r.ci) > _width(wilson(k, n)) + 0.01
    assert widened  # the blocklist's all-seed refusals make at least one label cluster

    report = (out / "report" / "report.md").read_text()
    assert "seeds per prompt: 3 (from the records); intervals treat the seeds" in report
    assert "accounts for seeds clustered within prompts" in report
    assert "## Seeds: refusal per prompt" in report and "on some seeds (flaky)" in report
    benign = clustered_rate(expected["benign"])
    assert f"| violence | {fmt_clustered(benign)} |" in report

    rows = list(csv.DictReader((out / "report" / "per_category.csv").open()))
    flaky = next(
        r
        for r in rows
        if (r["category"], r["label"], r["measure"])
        == ("violence", "benign", "prompts_refused:sometimes")
    )
    assert int(flaky["k"]) == sum(0 < k < n for k, n in expected["benign"])
    assert int(flaky["n"]) == len(expected["benign"])
    refusal = next(
        r
        for r in rows
        if (r["category"], r["label"], r["measure"]) == ("violence", "benign", "refusal")
    )
    assert float(refusal["ci_low"]) == pytest.approx(benign.ci[0], abs=1e-6)

    # refusal as a per-prompt probability: one row per prompt, and their mean in the report
    per_prompt = list(csv.DictReader((out / "report" / "per_prompt.csv").open()))
    assert len(per_prompt) == len(things)
    for lab, counts in expected.items():
        got = sorted(
            (int(r["seeds_refused"]), int(r["seeds_judged"]), float(r["p_refused"]))
            for r in per_prompt
            if r["label"] == lab
        )
        assert got == sorted((k, n, round(k / n, 6)) for k, n in counts)
    mean_benign = sum(k / n for k, n in expected["benign"]) / len(expected["benign"])
    assert f"| {100 * mean_benign:.1f}% ({len(expected['benign'])} prompts) |" in report

    pytest.importorskip("matplotlib")
    assert main(["report", str(out), "--html"]) == 0
    page = (out / "report" / "html" / "index.html").read_text()
    assert f"<td>violence</td><td>{fmt_clustered(benign)}</td>" in page
    assert "always / sometimes / never" in page
