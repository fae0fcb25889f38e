"""Statistics over outcomes: intervals, tables and tests (t2i_eval/stats.py)."""

import math
import random
import sys

import pytest
from helpers import make_generation

from t2i_eval.stats import (
    Cell,
    Table,
    fmt_rate,
    macro,
    mcnemar_clustered,
    mcnemar_exact,
    tabulate,
    wilson,
)
from t2i_eval.types import Generation, Outcome, Prompt, Verdict, outcomes


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [
        # reference: scipy.stats.binomtest(k, n).proportion_ci(method='wilson'), 6 decimals
        (0, 10, 0.0, 0.277533),
        (5, 10, 0.236593, 0.763407),
        (10, 10, 0.722467, 1.0),
        (1, 100, 0.001767, 0.054486),
        (81, 263, 0.255289, 0.366210),
    ],
)
def test_wilson_matches_hand_computed(k, n, lo, hi):
    got = wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-5)
    assert got[1] == pytest.approx(hi, abs=1e-5)


def test_wilson_empty_is_nan():
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_fmt_rate_states_k_n_and_interval():
    assert fmt_rate(5, 10) == "50.0% (5 / 10) [23.7%, 76.3%]"
    assert fmt_rate(0, 0) == "n/a (0 / 0)"


def test_tabulate_counts_errors_apart_and_causes():
    prompts = [
        Prompt("a", "x", "violence", "benign"),
        Prompt("b", "y", "violence", "unsafe"),
        Prompt("c", "z", "self_harm", "benign"),
    ]
    gens = {
        "1": make_generation("1", "a", "refused", "prompt_guard:blocklist"),
        "2": make_generation("2", "a", "ok"),
        "3": make_generation("3", "a", "error"),
        "4": make_generation("4", "b", "refused", "image_guard:safety_checker"),
        "5": make_generation("5", "c", "ok"),
    }
    blank = {"2": Verdict("2", "blank@1", True), "5": Verdict("5", "blank@1", False)}
    t = tabulate(prompts, gens, outcomes(gens, blank))
    vb = t.cell("violence", "benign")
    assert (vb.n, vb.refused, vb.errors) == (2, 2, 1)
    assert vb.by_cause["prompt_guard"] == 1 and vb.by_cause["blank"] == 1
    assert t.cell("violence", "unsafe").by_cause["image_guard"] == 1
    assert t.categories == ["violence", "self_harm"]  # OVERT order, not alphabetical
    micro = t.micro("benign")
    assert (micro.n, micro.refused) == (3, 2)
    m = t.macro("benign")
    assert m.rate == pytest.approx((1.0 + 0.0) / 2)


def test_macro_interval_normal_approximation():
    cells = [Cell(n=10, refused=5), Cell(n=40, refused=10)]
    m = macro(cells)
    q1, q2 = 7 / 14, 12 / 44  # (k + 2) / (n + 4)
    var = (q1 * (1 - q1) / 14 + q2 * (1 - q2) / 44) / 4
    assert m.rate == pytest.approx(0.375)
    assert m.ci[0] == pytest.approx(0.375 - 1.959964 * math.sqrt(var), abs=1e-6)
    zero = macro([Cell(n=50, refused=0), Cell(n=50, refused=0)])
    assert zero.rate == 0.0 and zero.ci[0] == 0.0 and zero.ci[1] > 0.01


def test_pair_table_matches_by_pair_and_seed():
    from t2i_eval.stats import pair_table

    prompts = [
        Prompt("b", "x", "violence", "benign", pair_id="P"),
        Prompt("u", "y", "violence", "unsafe", pair_id="P"),
    ]
    gens = {
        "1": Generation("1", "b", 0, "ok", image_path="i"),
        "2": Generation("2", "u", 0, "refused", "prompt_guard:g"),
        "3": Generation("3", "b", 1, "refused", "prompt_guard:g"),
        "4": Generation("4", "u", 1, "refused", "prompt_guard:g"),
        "5": Generation("5", "b", 2, "ok", image_path="i"),
        "6": Generation("6", "u", 2, "error"),
    }
    blank = {r: Verdict(r, "blank@1", False) for r in ("1", "5")}
    cell = pair_table(prompts, gens, outcomes(gens, blank))["violence"]
    assert (cell.n, cell.correct, cell.benign_refused, cell.unsafe_accepted) == (2, 1, 1, 0)


def test_mcnemar_exact_against_hand_values():
    from t2i_eval.stats import mcnemar_exact

    # b=8, c=2: 2 * (C(10,0)+C(10,1)+C(10,2)) / 2^10 = 2 * 56 / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(12, 0) == pytest.approx(2 / 4096)


def test_safe_response_needs_a_harm_verdict_for_every_accepted_record():
    from t2i_eval.stats import tabulate

    prompts = [Prompt("u1", "x", "violence", "unsafe"), Prompt("u2", "y", "violence", "unsafe")]
    gens = {
        "1": make_generation("1", "u1", "refused", "prompt_guard:g"),
        "2": Generation("2", "u2", 0, "ok", image_path=None),
    }
    cell = tabulate(prompts, gens, outcomes(gens, {})).cell("violence", "unsafe")
    assert (cell.safe_k, cell.safe_n, cell.safe_unknown) == (1, 1, 1)  # reported as n/a
    gens["2"] = make_generation("2", "u2", "ok")
    harm = {"2": Verdict("2", "harm@1", True)}
    cell = tabulate(
        prompts, gens, outcomes(gens, {"2": Verdict("2", "blank@2", False)}), harm
    ).cell("violence", "unsafe")
    assert (cell.safe_k, cell.safe_n, cell.safe_unknown) == (1, 2, 0)


def test_clustered_mcnemar_reduces_to_the_plain_chi_square_with_one_pair_per_cluster():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(7, 2), (3, 3), (10, 0), (1, 4)]:
        clusters = [(1, 0)] * b + [(0, 1)] * c + [(0, 0)] * 5
        want = 1.0 if b == c else stats.chi2.sf((b - c) ** 2 / (b + c), 1)
        assert mcnemar_clustered(clusters) == pytest.approx(want)
    assert mcnemar_clustered([]) == 1.0 and mcnemar_clustered([(2, 2), (0, 0)]) == 1.0


def test_clustered_mcnemar_worked_example():
    # B = 4, C = 1, sum (b_k - c_k)^2 = 4 + 4 + 1 = 9: X^2 = 9 / 9 = 1, p = P(chi2_1 > 1)
    assert mcnemar_clustered([(2, 0), (2, 0), (0, 1)]) == pytest.approx(0.31731, abs=1e-5)


def test_clustered_mcnemar_holds_its_size_where_seeds_agree():
    # Null: no difference between systems, but a prompt that is discordant is so on all 4
    # seeds, in a direction drawn at random. Counting each seed as its own pair inflates the
    # evidence (about 4x the variance of B - C, so the exact test rejects about a third of the
    # time at alpha 0.05); the clustered test must stay near 0.05.
    rng = random.Random(7)
    reps, prompts, seeds = 2000, 40, 4
    naive = clustered = 0
    for _ in range(reps):
        clusters = []
        for _ in range(prompts):
            if rng.random() < 0.3:
                clusters.append((seeds, 0) if rng.random() < 0.5 else (0, seeds))
            else:
                clusters.append((0, 0))
        b = sum(x for x, _ in clusters)
        c = sum(y for _, y in clusters)
        naive += mcnemar_exact(b, c) < 0.05
        clustered += mcnemar_clustered(clusters) < 0.05
    assert naive / reps > 0.2
    assert 0.02 <= clustered / reps <= 0.08


def _seeded_table(prompts: int, seeds: int):
    """`prompts` prompts in two categories, `seeds` records each, refused by a rotating cause."""
    ps = [Prompt(f"p{i}", "t", ("violence", "sexual")[i % 2], "benign") for i in range(prompts)]
    causes = ("prompt_guard", "generator", "image_guard", None)
    gens, outs = {}, {}
    for i, p in enumerate(ps):
        for s in range(seeds):
            rid = f"r{i}-{s}"
            gens[rid] = Generation(rid, p.id, s, "ok")
            cause = causes[(i + s) % len(causes)]
            outs[rid] = (Outcome.COMPLIED, None) if cause is None else (Outcome.REFUSED, cause)
    return ps, gens, outs


def test_each_prompts_counts_sum_to_its_cells_cause_by_cause():
    ps, gens, outs = _seeded_table(40, 3)
    t = tabulate(ps, gens, outs)
    for cell in [*t.cells.values(), t.micro("benign")]:
        for cause, k in cell.by_cause.items():
            assert sum(c.by_cause.get(cause, 0) for c in cell.per_prompt.values()) == k
        assert sum(c.refused for c in cell.per_prompt.values()) == cell.refused
    one = t.cell("violence", "benign").per_prompt["p0"]  # seeds 0, 1, 2 -> causes 0, 1, 2
    assert one.by_cause == {"prompt_guard": 1, "generator": 1, "image_guard": 1}


def test_prompts_counted_alike_share_one_counts_object_and_a_mapping_counts_as_a_list():
    """Counting steps between shared, read-only per-prompt counts (a 100,000-prompt run holds a
    few objects, not one per prompt): equal counts must be one object, different counts
    different objects, and every prompt's counts what counting it alone gives."""
    ps, gens, outs = _seeded_table(40, 3)
    t = tabulate(ps, gens, outs)
    assert tabulate({p.id: p for p in ps}, gens, outs) == t
    cell = t.cell("violence", "benign")
    by_counts: dict[tuple, set[int]] = {}
    for pid, c in cell.per_prompt.items():
        alone = tabulate([p for p in ps if p.id == pid], gens, outs).cell("violence", "benign")
        assert c == alone.per_prompt[pid]
        by_counts.setdefault((c.n, c.refused, c.causes), set()).add(id(c))
    assert len(by_counts) > 1
    assert all(len(ids) == 1 for ids in by_counts.values())


def test_equal_counts_reached_in_another_order_are_one_object():
    ps = [Prompt(f"p{i}", "t", "violence", "benign") for i in range(2)]
    seq = {"p0": [(Outcome.REFUSED, "prompt_guard"), (Outcome.COMPLIED, None)],
           "p1": [(Outcome.COMPLIED, None), (Outcome.REFUSED, "prompt_guard")]}
    gens, outs = {}, {}
    for pid, steps in seq.items():
        for s, out in enumerate(steps):
            gens[f"{pid}-{s}"] = Generation(f"{pid}-{s}", pid, s, "ok")
            outs[f"{pid}-{s}"] = out
    counts = tabulate(ps, gens, outs).cell("violence", "benign").per_prompt
    assert counts["p0"] is counts["p1"]
    assert (counts["p0"].n, counts["p0"].refused) == (2, 1)


def test_pooled_rows_read_their_cells_prompt_counts_without_copying_them():
    """`Table.micro` over a counted run (one cell per prompt) reads the cells' own per-prompt
    maps as one: the same prompts, counts, rates and shares as a merged copy gives."""
    ps, gens, outs = _seeded_table(40, 3)
    t = tabulate(ps, gens, outs)
    copy = Table(t.cells, t.categories, t.seeds_per_prompt)  # merges into a new map
    view, merged = t.micro("benign"), copy.micro("benign")
    assert not isinstance(view.per_prompt, dict) and isinstance(merged.per_prompt, dict)
    assert dict(view.per_prompt.items()) == merged.per_prompt
    assert len(view.per_prompt) == len(merged.per_prompt) == 40
    assert list(view.per_prompt.values()) == list(view.per_prompt.values())  # a view, reusable
    assert view.per_prompt["p1"] is t.cell("sexual", "benign").per_prompt["p1"]
    with pytest.raises(KeyError):
        view.per_prompt["nope"]
    assert (view.refusal, view.shares, view.records_per_prompt()) == (
        merged.refusal, merged.shares, merged.records_per_prompt()
    )


def _deep_size(obj: object) -> int:
    """Bytes of `obj` and of the containers its slots hold (not the ints and strings in them,
    which are shared)."""
    held = (getattr(obj, f) for f in obj.__slots__)  # type: ignore[attr-defined]
    return sys.getsizeof(obj) + sum(
        sys.getsizeof(v) for v in held if isinstance(v, (dict, list, tuple))
    )


def test_a_prompts_counts_take_a_fraction_of_a_full_cell():
    """A 100,000-prompt run holds one set of per-prompt counts per prompt: they must not cost
    what a whole `Cell` (with its own per-prompt and per-cause maps) costs."""
    ps, gens, outs = _seeded_table(8, 1)
    cell = tabulate(ps, gens, outs).cell("violence", "benign")
    refused = next(c for c in cell.per_prompt.values() if c.refused)
    full = Cell(n=refused.n, refused=refused.refused, by_cause=refused.by_cause)
    assert _deep_size(refused) < _deep_size(full) / 2
