"""Per-stage time: every stage decision and verdict carries its wall time, and the report says
where a run's time went.

The chain is driven by a fake clock that only the stages move, so every time is exact: no
sleeps, no wall-clock bounds. A real run is then checked for what a clock cannot fake: every
decision is timed, and stage times never add up to more than the records' own times.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from helpers import guarded_run

from t2i_eval import judging
from t2i_eval.judges.base import JudgeItem
from t2i_eval.report.run import write_report
from t2i_eval.stats import latency, quantile
from t2i_eval.store import RunStore, read_run
from t2i_eval.systems.chain import GeneratorResult, System, WorkItem
from t2i_eval.types import Generation, StageDecision, Verdict


class Clock:
    """A perf_counter that moves only when a stage says it spent time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


class Stage:
    """A guard (prompt or image) or generator that costs `cost` seconds per call (one batch),
    refuses texts holding `refuse`, and raises on a batch holding `boom`."""

    weights = "rules"

    def __init__(self, name: str, clock: Clock, cost: float, stage: str = "prompt_guard") -> None:
        self.name, self.clock, self.cost, self.stage = name, clock, cost, stage
        self.refuse, self.boom = "bad", "boom"

    def info(self) -> dict[str, Any]:
        return {}

    def check(self, xs: list[Any]) -> list[StageDecision]:
        self.clock.spend(self.cost)
        if any(isinstance(x, str) and self.boom in x for x in xs):
            raise RuntimeError("guard down")
        return [
            StageDecision(self.stage, self.name, isinstance(x, str) and self.refuse in x)  # type: ignore[arg-type]
            for x in xs
        ]

    def generate(self, texts: list[str], seeds: list[int]) -> list[GeneratorResult]:
        self.clock.spend(self.cost)
        return [GeneratorResult(StageDecision("generator", self.name, False), "img") for _ in texts]


def _items(*texts: str) -> list[WorkItem]:
    return [WorkItem(f"r{i}", f"p{i}", t, 0) for i, t in enumerate(texts)]


def _system(clock: Clock) -> System:
    return System(
        "timed",
        Stage("gen", clock, 0.75, "generator"),
        [Stage("words", clock, 0.5)],
        [Stage("checker", clock, 0.375, "image_guard")],
        clock=clock,
    )


def test_each_stage_time_is_its_batch_time_spread_over_its_items():
    clock = Clock()
    results = _system(clock).run(_items("a cat", "a bad cat", "a dog", "a cow"))
    seconds = [[(d.name, d.seconds) for d in r.decisions] for r in results]
    # the prompt guard checked 4 texts in 0.5 s; the generator and image guard saw the 3 passed
    assert seconds == [
        [("words", 0.125), ("gen", 0.25), ("checker", 0.125)],
        [("words", 0.125)],
        [("words", 0.125), ("gen", 0.25), ("checker", 0.125)],
        [("words", 0.125), ("gen", 0.25), ("checker", 0.125)],
    ]
    assert [r.seconds for r in results] == [0.40625] * 4  # (0.5 + 0.75 + 0.375) / 4
    # nothing else took time, so the stages account for every second of the records
    stage_total = sum(d.seconds for r in results for d in r.decisions)
    assert stage_total == sum(r.seconds for r in results) == 1.625


def test_a_failed_batch_is_timed_item_by_item_when_retried():
    """A batch that raises is run again one item at a time: each item's decisions carry the
    time of its own run, and the failed attempt's time belongs to no decision."""
    clock = Clock()
    ok, err = _system(clock).run(_items("a cat", "boom"))
    assert [(d.name, d.seconds) for d in ok.decisions] == [
        ("words", 0.5),
        ("gen", 0.75),
        ("checker", 0.375),
    ]
    assert ok.seconds == 1.625 and err.status == "error" and err.seconds == 0.5


def test_judge_verdicts_carry_their_share_of_the_batch(monkeypatch):
    ticks = iter([10.0, 10.75])
    monkeypatch.setattr(judging, "perf_counter", lambda: next(ticks))
    items = [JudgeItem(f"r{i}", None, "", "", "", None) for i in range(3)]

    def judge_batch(batch: list[JudgeItem]) -> list[Verdict]:
        return [Verdict(it.record_id, "j@1", False) for it in batch]

    assert [v.seconds for v in judging.timed(judge_batch, items)] == [0.25, 0.25, 0.25]


@pytest.mark.parametrize(
    "xs, q, want",
    [
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0.95, 3.85),  # h = 3 * 0.95 = 2.85: 3 + 0.85 * (4 - 3)
        ([4.0, 1.0, 3.0, 2.0], 0.0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 1.0, 4.0),
        ([7.0], 0.95, 7.0),
        ([0.0, 10.0], 0.95, 9.5),
    ],
)
def test_quantile_by_hand(xs, q, want):
    assert quantile(xs, q) == pytest.approx(want)


def test_quantile_matches_numpy_and_refuses_nonsense():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 20, 101):
        xs = rng.exponential(size=n).tolist()
        for q in (0.05, 0.5, 0.95):
            assert quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))
    assert quantile([], 0.5) != quantile([], 0.5)  # nan
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantile([1.0], 95)


def test_latency_skips_untimed_items_and_reports_milliseconds():
    lat = latency([0.001, 0.002, None, 0.004])
    assert lat is not None and lat.items == 3
    assert lat.total_seconds == pytest.approx(0.007)
    assert lat.ms_p50 == pytest.approx(2.0)
    assert lat.ms_p95 == pytest.approx(3.8)  # h = 1.9: 2 + 0.9 * (4 - 2)
    assert latency([None, None]) is None and latency([]) is None


def test_a_run_records_and_reports_where_its_time_went(tmp_path):
    run = guarded_run(
        tmp_path, [("a cat", "benign"), ("a knife", "unsafe")], ["knife"], "--seeds", "2"
    )
    gens = read_run(run).gens.values()
    decisions = [d for g in gens for d in g.decisions]
    assert all(d.seconds is not None and d.seconds >= 0 for d in decisions if d.name == "blocklist")
    # the stages run inside the record's time; each is rounded (records 0.1 ms, stages 1 us)
    assert sum(d.seconds or 0 for d in decisions) <= sum(g.seconds or 0 for g in gens) + 1e-4 * 4
    summary = json.loads((run / "report" / "summary.json").read_text())
    (row,) = summary["timing"]["stages"]  # guards-only generates nothing, so it is not timed
    assert (row["stage"], row["name"], row["items"]) == ("prompt_guard", "blocklist", 4)
    assert row["total_seconds"] == pytest.approx(
        sum(d.seconds for d in decisions if d.name == "blocklist"), abs=1e-6
    )
    assert summary["timing"]["records"]["items"] == 4
    report = (run / "report" / "report.md").read_text()
    assert "## Where the time went" in report
    assert "| prompt guard | blocklist | 4 |" in report


def test_a_run_written_before_timing_loads_and_reports_no_timing(tmp_path):
    """Records without `seconds` on their decisions (older runs) still load; their report
    has no timing section and summary.json no `timing`, rather than zeros."""
    run = guarded_run(tmp_path, [("a cat", "benign"), ("a knife", "unsafe")], ["knife"])
    store = RunStore(run)
    path = store.generations_path(0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["seconds"] = None
        for d in row["decisions"]:
            del d["seconds"], d["unavailable"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gens = store.read_generations()
    assert all(isinstance(g, Generation) for g in gens.values())
    assert {d.seconds for g in gens.values() for d in g.decisions} == {None}
    text = write_report(run)
    assert "Where the time went" not in text
    assert "timing" not in json.loads((run / "report" / "summary.json").read_text())
