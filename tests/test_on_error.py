"""Fail-open or fail-closed: a guard's `on_error: error | pass | refuse`, end to end.

Two test guards play an unavailable service, each registered with one dict entry (as a real
guard would be): one raises on prompts holding "down", one answers "could not check"
(refused=None) for them; both refuse prompts holding "bad" and pass the rest. Every policy is
run through the runner and the report, and checked against what the rule promises: `error` is
today's error (retried on resume), `pass` and `refuse` are recorded as unavailable decisions,
never retried, counted apart in the report and never as the guard's own judgement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import write_suite

from t2i_eval.cli import main
from t2i_eval.report.run import write_report
from t2i_eval.runner import RunResult, run
from t2i_eval.store import read_run
from t2i_eval.suites import load_suite
from t2i_eval.sweep import guard_scores
from t2i_eval.systems import parse_system
from t2i_eval.systems.registry import IMAGE_GUARDS, PROMPT_GUARDS
from t2i_eval.types import Outcome, StageDecision


class _Words:
    """Refuses "bad" (score 1 > threshold 0.5), passes the rest (score 0)."""

    weights = "rules"

    def info(self) -> dict[str, Any]:
        return {"rule": "refuse 'bad'; 'down' plays an unavailable service"}

    def _decide(self, text: str) -> StageDecision:
        bad = "bad" in text
        return StageDecision("prompt_guard", self.name, bad, score=float(bad), threshold=0.5)  # type: ignore[attr-defined]


class RaisingGuard(_Words):
    """Raises on any batch holding a prompt with "down" (the service is down)."""

    name = "raising"

    def check(self, texts: list[str]) -> list[StageDecision]:
        if any("down" in t for t in texts):
            raise ConnectionError("moderation service unreachable")
        return [self._decide(t) for t in texts]


class UnsureGuard(_Words):
    """Answers "could not check" (refused=None) for prompts holding "down"."""

    name = "unsure"

    def check(self, texts: list[str]) -> list[StageDecision]:
        return [
            StageDecision("prompt_guard", self.name, None, raw={"status": 503}, message="timeout")
            if "down" in t
            else self._decide(t)
            for t in texts
        ]


class DownImageGuard:
    """An image guard whose service is always down."""

    name = "down_checker"
    weights = "rules"

    def info(self) -> dict[str, Any]:
        return {}

    def check(self, images: list[Any]) -> list[StageDecision]:
        raise TimeoutError("checker timed out")


ROWS = [
    ("a calm lake", "benign"),
    ("a bad lake", "unsafe"),
    ("down by the river", "benign"),
    ("a bad town down south", "unsafe"),
    ("a sunny meadow", "benign"),
]
#: Prompts the guard cannot check ("down"), by label: one benign, one unsafe.
DOWN = {"down by the river": "benign", "a bad town down south": "unsafe"}


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PROMPT_GUARDS, "raising", f"{__name__}:RaisingGuard")
    monkeypatch.setitem(PROMPT_GUARDS, "unsure", f"{__name__}:UnsureGuard")
    monkeypatch.setitem(IMAGE_GUARDS, "down_checker", f"{__name__}:DownImageGuard")


def _system(tmp_path: Path, guard: str, policy: str | None) -> Path:
    opt = f", on_error: {policy}" if policy is not None else ""
    path = tmp_path / "sys.yaml"
    path.write_text(f"prompt_guards: [{{name: {guard}{opt}}}]\ngenerator: guards-only\n")
    return path


def _run(tmp_path: Path, system: Path) -> RunResult:
    """Generate (and judge) into tmp_path/run, then write its report, as `t2i-eval run` does."""
    suite = load_suite(str(write_suite(tmp_path / "s.jsonl", ROWS)))
    result = run(
        suite, parse_system(str(system)), out=tmp_path / "run", progress=False, batch_size=8
    )
    write_report(result.run_dir)
    return result


def _by_text(run_dir: Path) -> dict[str, Any]:
    data = read_run(run_dir)
    text = {p.id: p.text for p in data.prompts}
    return {text[g.prompt_id]: (g, data.outcome(g.record_id)) for g in data.gens.values()}


@pytest.mark.parametrize("guard", ["raising", "unsure"])
@pytest.mark.parametrize("policy", [None, "error"])
def test_error_is_todays_behaviour_and_is_retried(tmp_path, guard, policy):
    """The default: an item the guard could not check is an error, and a rerun retries it.
    (A raising guard's batch is retried item by item, so the other prompts still get real
    decisions.)"""
    result = _run(tmp_path, _system(tmp_path, guard, policy))
    recs = _by_text(result.run_dir)
    assert {t for t, (g, _) in recs.items() if g.status == "error"} == set(DOWN)
    assert recs["a bad lake"][1] == (Outcome.REFUSED, "prompt_guard")
    assert all(d.unavailable is None for g, _ in recs.values() for d in g.decisions)
    again = _run(tmp_path, _system(tmp_path, guard, policy))
    assert (again.skipped, again.done, again.failed) == (3, 2, 2)


@pytest.mark.parametrize("guard", ["raising", "unsure"])
def test_pass_records_a_fail_open_decision_never_retried(tmp_path, guard):
    result = _run(tmp_path, _system(tmp_path, guard, "pass"))
    recs = _by_text(result.run_dir)
    for text in DOWN:
        g, (out, cause) = recs[text]
        (d,) = g.decisions[:1]
        assert (g.status, out, d.refused, d.score, d.threshold) == (
            "ok",
            Outcome.COMPLIED,
            False,
            None,
            None,
        )
        reason = (
            "ConnectionError: moderation service unreachable" if guard == "raising" else "timeout"
        )
        assert d.unavailable == f"pass: {reason}"
    assert recs["a bad lake"][1] == (Outcome.REFUSED, "prompt_guard")  # real decisions unchanged
    assert recs["a calm lake"][0].decisions[0].unavailable is None
    assert result.failed == 0
    again = _run(tmp_path, _system(tmp_path, guard, "pass"))
    assert (again.skipped, again.done) == (5, 0)


@pytest.mark.parametrize("guard", ["raising", "unsure"])
def test_refuse_refuses_the_record_as_deployed_and_is_counted_apart(tmp_path, guard):
    result = _run(tmp_path, _system(tmp_path, guard, "refuse"))
    recs = _by_text(result.run_dir)
    for text in DOWN:
        g, outcome = recs[text]
        d = g.decisions[0]
        assert outcome == (Outcome.REFUSED, "prompt_guard")
        assert g.refused_by == f"prompt_guard:{guard}"
        assert (d.refused, d.score, d.unavailable.split(":")[0]) == (True, None, "refuse")
    if guard == "unsure":  # the guard's own raw numbers are kept, apart
        assert recs["down by the river"][0].decisions[0].raw == {"unavailable_raw": {"status": 503}}
    assert _run(tmp_path, _system(tmp_path, guard, "refuse")).done == 0  # not retried

    summary = json.loads((result.run_dir / "report" / "summary.json").read_text())
    # the system as deployed refused the benign "down" prompt: over-refusal counts it
    assert summary["micro"]["benign"]["refused"] == 1
    assert summary["micro"]["benign"]["by_cause"]["prompt_guard"] == 1
    assert summary["guards_unavailable"] == {
        f"prompt_guard:{guard}": {
            "on_error": "refuse",
            "decisions": 5,
            "error": 0,
            "pass": 0,
            "refuse": 2,
            "refused_records": {"benign": 1, "unsafe": 1},
        }
    }
    # ... but the guard itself refused no benign prompt: its metrics see only real decisions
    m = summary["guards"][guard]["all"]
    assert (m["n_benign"], m["benign_refused"], m["n_unsafe"], m["unsafe_refused"]) == (2, 0, 1, 1)
    data = read_run(result.run_dir)
    assert len(guard_scores(data.prompts, data.gens)[guard]) == 3
    report = (result.run_dir / "report" / "report.md").read_text()
    assert "## Guards unavailable (on_error)" in report
    assert f"| prompt_guard:{guard} | refuse | 5 | 0 | 0 | 2 | 1 / 1 |" in report


@pytest.mark.parametrize("policy", ["pass", "error"])
def test_the_report_counts_unavailable_passes_apart(tmp_path, policy):
    """A pass is listed per guard; a guard left at `error` gets no row (its items are errors,
    counted in the errors column)."""
    result = _run(tmp_path, _system(tmp_path, "unsure", policy))
    text = (result.run_dir / "report" / "report.md").read_text()
    unavailable = json.loads((result.run_dir / "report" / "summary.json").read_text())[
        "guards_unavailable"
    ]
    if policy == "error":
        assert unavailable == {} and "Guards unavailable" not in text
    else:
        assert unavailable["prompt_guard:unsure"]["pass"] == 2
        assert "| prompt_guard:unsure | pass | 5 | 0 | 2 | 0 | 0 / 0 |" in text


@pytest.mark.parametrize(
    "policy, status, delivered, outcome",
    [
        ("pass", "ok", "image", Outcome.COMPLIED),
        ("refuse", "refused", "black", Outcome.REFUSED),
    ],
)
def test_an_image_guard_takes_on_error_too(tmp_path, policy, status, delivered, outcome):
    system = tmp_path / "sys.yaml"
    system.write_text(
        "generator: {name: fake, refuse_words: [bad]}\n"
        f"image_guards: [{{name: down_checker, on_error: {policy}}}]\n"
    )
    result = _run(tmp_path, system)
    recs = _by_text(result.run_dir)
    g, (out, cause) = recs["a calm lake"]
    assert (g.status, g.delivered, out) == (status, delivered, outcome)
    assert g.decisions[-1].unavailable == f"{policy}: TimeoutError: checker timed out"
    if policy == "refuse":
        assert (cause, g.refused_by) == ("image_guard", "image_guard:down_checker")
    assert recs["a bad lake"][0].refused_by == "generator:fake"  # the guard never saw it


def test_out_of_memory_still_halves_the_batch_under_pass():
    """Fail-open is for an unavailable guard, not for a batch too large for the device."""
    from t2i_eval.systems.chain import BatchTooLarge, System, WorkItem
    from t2i_eval.systems.fake import FakeGenerator

    class Oom(UnsureGuard):
        def check(self, texts: list[str]) -> list[StageDecision]:
            if len(texts) > 1:
                raise RuntimeError("CUDA out of memory")
            return super().check(texts)

    system = System("s", FakeGenerator(), [Oom()], on_error={"prompt_guard:unsure": "pass"})
    items = [WorkItem(f"r{i}", f"p{i}", t, 0) for i, (t, _) in enumerate(ROWS)]
    with pytest.raises(BatchTooLarge):
        system.run(items)
    (one,) = system.run(items[2:3])
    assert one.status == "ok" and one.decisions[0].unavailable == "pass: timeout"


@pytest.mark.parametrize(
    "value, found",
    [("maybe", "found 'maybe'"), ("5", "found a number"), ("[pass]", "found a list")],
)
def test_a_bad_on_error_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, value, found):
    out = tmp_path / "run"
    suite = write_suite(tmp_path / "s.jsonl", ROWS)
    system = tmp_path / "sys.yaml"
    system.write_text(f"prompt_guards: [{{name: blocklist, on_error: {value}}}]\ngenerator: fake\n")
    argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(out), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "prompt guard 'blocklist': option 'on_error' must be one of error, pass, refuse" in err
    assert found in err
    assert not out.exists()


def test_on_error_belongs_to_guards_only(tmp_path, capsys):
    out = tmp_path / "run"
    suite = write_suite(tmp_path / "s.jsonl", ROWS)
    system = tmp_path / "sys.yaml"
    system.write_text("generator: {name: fake, on_error: pass}\n")
    argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(out), "-q"]
    assert main(argv) == 2
    assert "generator 'fake' has no option 'on_error'" in capsys.readouterr().err
    assert not out.exists()


def test_every_registered_guard_accepts_on_error_with_no_code_of_its_own(tmp_path):
    """`on_error` is split off by the spec checks, so no guard's constructor needs to know it."""
    from probe_parts import save_tiny_probe

    from t2i_eval.systems import validate_spec
    from t2i_eval.systems.spec import ComponentSpec, SystemSpec

    needed = {  # the options a guard cannot do without
        "probe": {"model": str(save_tiny_probe(tmp_path / "probe"))},  # a trained folder
        "llm-guard": {"model": "org/some-guard", "base_url": "http://127.0.0.1:9/v1"},
    }
    for name in PROMPT_GUARDS:
        guard = ComponentSpec(name, {**needed.get(name, {}), "on_error": "refuse"})
        validate_spec(SystemSpec("s", ComponentSpec("guards-only"), prompt_guards=(guard,)))
    for name in IMAGE_GUARDS:
        guard = ComponentSpec(name, {"on_error": "pass"})
        validate_spec(SystemSpec("s", ComponentSpec("fake"), image_guards=(guard,)))
