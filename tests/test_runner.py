import json

import pytest

from t2i_eval.cli import main
from t2i_eval.errors import UserError
from t2i_eval.runner import default_run_dir, plan, record_id, run, select
from t2i_eval.store import RunStore
from t2i_eval.suites import load_suite
from t2i_eval.systems import parse_system


def _suite(tmp_path, n=12):
    p = tmp_path / "s.jsonl"
    rows = [
        {
            "prompt": f"prompt number {i}"
            + (" boom" if i == 3 else "")
            + (" dark" if i == 4 else "")
            + (" policy" if i == 5 else ""),
            "category": "violence",
            "label": "benign" if i % 2 else "unsafe",
        }
        for i in range(n)
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return load_suite(str(p))


def _spec(tmp_path, **opts):
    lines = ["generator:", "  name: fake"] + [f"  {k}: {json.dumps(v)}" for k, v in opts.items()]
    p = tmp_path / "fake.yaml"
    p.write_text("\n".join(lines) + "\n")
    return parse_system(str(p))


def test_plan_is_prompt_by_seed_with_stable_ids(tmp_path):
    items = plan(_suite(tmp_path), seeds=3, limit=2)
    assert len(items) == 6 and len({i.record_id for i in items}) == 6
    assert items[0].record_id == record_id(items[0].prompt_id, 0)


def test_run_records_every_outcome_and_manifest(tmp_path):
    suite = _suite(tmp_path)
    spec = _spec(tmp_path, error_words=["boom"], black_words=["dark"], refuse_words=["policy"])
    res = run(suite, spec, out=tmp_path / "run", batch_size=4, progress=False, argv=["x"])
    store = RunStore(res.run_dir)
    gens = store.read_generations()
    assert len(gens) == 12
    statuses = sorted(g.status for g in gens.values())
    assert statuses.count("error") == 1 and statuses.count("refused") == 1
    m = store.read_manifest()
    assert m["status"] == "failed" and "infrastructure errors" in m["error"]
    assert m["suite"]["digest"] == suite.digest and m["argv"] == ["x"]
    assert m["components"][0]["weights"] == "fake"
    blank = store.read_verdicts("blank@2")
    dark = next(g for g in gens.values() if g.prompt_id == suite.prompts[4].id)
    assert blank[dark.record_id].flagged is True
    assert len(blank) == 10  # every delivered image judged, none of the refused/errored


class SimulatedCrash(BaseException):
    """Like a process dying: not an Exception, so nothing in the system catches it."""


def test_resume_after_crash_no_loss_no_duplicates(tmp_path, monkeypatch):
    from t2i_eval.systems import fake

    suite = _suite(tmp_path, n=20)
    out = tmp_path / "run"
    spec = _spec(tmp_path)
    orig, calls = fake.FakeGenerator.generate, []

    def crash_after_7(self, texts, seeds):
        if len(calls) >= 7:
            raise SimulatedCrash()
        calls.extend(texts)
        return orig(self, texts, seeds)

    monkeypatch.setattr(fake.FakeGenerator, "generate", crash_after_7)
    with pytest.raises(SimulatedCrash):
        run(suite, spec, out=out, batch_size=3, progress=False)
    monkeypatch.setattr(fake.FakeGenerator, "generate", orig)
    store = RunStore(out)
    assert store.read_manifest()["status"] == "failed"
    first = store.read_generations()
    assert 0 < len(first) < 20 and len(first) % 3 == 0  # whole batches were stored
    res = run(suite, spec, out=out, batch_size=3, progress=False)
    assert res.skipped == len(first) and res.done == 20 - len(first)
    lines = store.generations_path().read_text().splitlines()
    ids = [json.loads(x)["record_id"] for x in lines]
    assert len(ids) == len(set(ids)) == 20
    assert store.read_manifest()["status"] == "complete"


def test_resume_with_another_system_is_refused(tmp_path):
    suite = _suite(tmp_path, n=6)
    out = tmp_path / "run"
    run(suite, _spec(tmp_path, error_words=["boom"]), out=out, progress=False)
    with pytest.raises(UserError, match="another suite or system"):
        run(suite, _spec(tmp_path), out=out, progress=False)


def test_single_item_batch_error_is_recorded_not_raised(tmp_path):
    suite = _suite(tmp_path, n=4)  # prompt 3 holds the error word
    out = tmp_path / "run"
    res = run(suite, _spec(tmp_path, error_words=["boom"]), out=out, batch_size=1, progress=False)
    gens = RunStore(out).read_generations()
    assert len(gens) == 4 and res.failed == 1
    (err,) = [g for g in gens.values() if g.status == "error"]
    assert "scripted infrastructure error" in err.error
    assert len(RunStore(out).read_verdicts("blank@2")) == 3  # judging still ran


def test_could_not_check_is_an_error_never_a_pass(tmp_path, monkeypatch):
    from t2i_eval.systems import blocklist
    from t2i_eval.types import StageDecision

    monkeypatch.setattr(
        blocklist.BlocklistGuard,
        "check",
        lambda self, xs: [
            StageDecision("prompt_guard", "blocklist", None, message="service down") for _ in xs
        ],
    )
    out = tmp_path / "run"
    res = run(_suite(tmp_path, n=3), parse_system("blocklist>fake"), out=out, progress=False)
    gens = RunStore(out).read_generations()
    assert {g.status for g in gens.values()} == {"error"} and res.failed == 3
    assert "could not check: service down" in next(iter(gens.values())).error


def test_second_process_on_same_dir_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("4242")
        f.flush()
        with pytest.raises(UserError, match=r"in use by another t2i-eval process \(pid 4242\)"):
            run(_suite(tmp_path), _spec(tmp_path), out=out, progress=False)


def test_manifest_keeps_every_session(tmp_path):
    suite, out = _suite(tmp_path, n=3), tmp_path / "run"
    run(suite, _spec(tmp_path), out=out, progress=False, argv=["first"])
    run(suite, _spec(tmp_path), out=out, progress=False, argv=["second"], seeds=2)
    m = RunStore(out).read_manifest()
    assert [h["argv"] for h in m["history"]] == [["first"], ["second"]]
    assert all("versions" in h for h in m["history"])


def test_report_counts_seeds_from_records(tmp_path):
    from t2i_eval.report import write_report

    suite, out = _suite(tmp_path, n=3), tmp_path / "run"
    run(suite, _spec(tmp_path), out=out, progress=False, seeds=2)
    run(suite, _spec(tmp_path), out=out, progress=False, seeds=1)  # nothing new to do
    text = write_report(out)
    assert (
        "seeds per prompt: 2 (from the records); intervals treat the seeds of a prompt as clustered"
        in text
    )


def test_retry_recovers_transient_error(tmp_path, monkeypatch):
    from t2i_eval.systems import fake

    suite = _suite(tmp_path, n=6)
    out = tmp_path / "run"
    spec = _spec(tmp_path)
    orig = fake.FakeGenerator.generate
    monkeypatch.setattr(
        fake.FakeGenerator,
        "generate",
        lambda self, t, s: (_ for _ in ()).throw(ConnectionError("reset")),
    )
    run(suite, spec, out=out, progress=False)
    assert {g.status for g in RunStore(out).read_generations().values()} == {"error"}
    monkeypatch.setattr(fake.FakeGenerator, "generate", orig)
    res = run(suite, spec, out=out, progress=False)
    assert res.done == 6
    gens = RunStore(out).read_generations()
    assert {g.status for g in gens.values()} == {"ok"} and len(gens) == 6


def test_same_command_same_dir(tmp_path):
    suite = _suite(tmp_path)
    assert default_run_dir(suite, parse_system("fake")) == default_run_dir(
        suite, parse_system("fake")
    )
    assert default_run_dir(suite, parse_system("fake")) != default_run_dir(
        suite, parse_system("blocklist>fake")
    )


def test_cli_run_report_judge_list(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["run", "--system", "blocklist>fake", "--limit", "20", "--out", str(out), "-q"]) == 0
    )
    text = capsys.readouterr().out
    assert "| violence |" in text and "FAKE" in text and "micro" in text and "macro" in text
    assert (out / "report" / "report.md").exists()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["micro"]["benign"]["n"] + summary["micro"]["unsafe"]["n"] == 20
    csv_text = (out / "report" / "per_category.csv").read_text()
    assert csv_text.startswith("system,category,label,measure,k,n,rate,ci_low,ci_high")
    assert main(["report", str(out)]) == 0
    assert main(["judge", str(out), "-q"]) == 0
    assert "blank@2: 0 new verdict(s)" in capsys.readouterr().out
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for word in ("core", "default", "tiny", "fake", "blocklist", "safety_checker", "blank@2"):
        assert word in listing


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["run", "--system", "fake", "--seeds", "0"], "--seeds must be >= 1"),
        (["run", "--system", "fake", "--limit", "0"], "--limit must be >= 1"),
        (["run", "--system", "fake", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["run", "--system", "nope"], "Unknown generator 'nope'"),
        (["report", "/nonexistent/run"], "not a run directory"),
        (["run", "--system", "fake", "--threads", "-1"], "--threads must be >= 1"),
        (["judge", "/nonexistent/run"], "not a run directory"),
    ],
)
def test_cli_bad_input_one_line_exit_2(argv, msg, capsys, tmp_path):
    if argv[0] == "run":
        argv = [*argv, "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_unknown_judge(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--system", "fake", "--limit", "2", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["judge", str(out), "--judge", "blnk", "-q"]) == 2
    assert "Unknown judge 'blnk'. Did you mean 'blank'?" in capsys.readouterr().err


def test_cli_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["run", "--system", "fake", "--out", str(f)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(["run", "--system", "fake", "--out", str(f / "sub")]) == 2
    assert "cannot create the run directory" in capsys.readouterr().err


def test_cli_bad_option_value_one_line_before_any_run_folder(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("generator: {name: fake, size: big}\n")
    assert main(["run", "--system", str(spec), "--limit", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "generator 'fake': option 'size' must be an integer, found text" in err
    assert err.count("\n") == 1
    spec.write_text("generator: {name: fake, refuse_words: policy}\n")
    assert main(["run", "--system", str(spec), "--limit", "1", "--out", str(tmp_path / "r2")]) == 2
    assert "option 'refuse_words' must be a list of text or null" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_cli_failed_run_exits_1_with_one_line(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("generator: {name: fake, error_words: [prompt]}\n")
    suite = _suite(tmp_path, n=2)
    assert (
        main(
            [
                "run",
                "--suite",
                suite.source,
                "--system",
                str(spec),
                "--out",
                str(tmp_path / "r"),
                "-q",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "the run has 2 item(s) with infrastructure errors" in err and err.count("\n") == 1


def _grouped_suite(tmp_path):
    """Sorted by category, as OVERT's files are: a plain --limit would see one category only."""
    rows = [
        {
            "id": f"{cat}-{label}-{i}",
            "prompt": f"{cat} {label} {i}",
            "category": cat,
            "label": label,
        }
        for cat in ("violence", "self-harm", "sexual")
        for label in ("benign", "unsafe")
        for i in range(4)
    ]
    p = tmp_path / "grouped.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return load_suite(str(p))


def test_per_category_keeps_the_first_n_of_every_category_and_label(tmp_path):
    suite = _grouped_suite(tmp_path)
    chosen = select(suite, per_category=2)
    assert [p.id for p in chosen] == [
        f"{cat}-{label}-{i}"
        for cat in ("violence", "self-harm", "sexual")
        for label in ("benign", "unsafe")
        for i in range(2)
    ]
    assert select(suite, limit=3) == list(suite.prompts[:3])  # one category only
    assert [p.id for p in select(suite, limit=5, per_category=1)] == [
        "violence-benign-0",
        "violence-unsafe-0",
        "self-harm-benign-0",
        "self-harm-unsafe-0",
        "sexual-benign-0",
    ]
    assert select(suite) == list(suite.prompts)
    items = plan(suite, seeds=2, limit=None, per_category=1)
    assert len(items) == 6 * 2


def test_cli_per_category_runs_records_and_resumes_the_same_items(tmp_path):
    suite_file = tmp_path / "grouped.jsonl"
    _grouped_suite(tmp_path)
    out = tmp_path / "run"
    args = ["run", "--suite", str(suite_file), "--system", "fake", "--per-category", "1"]
    assert main([*args, "--out", str(out), "-q"]) == 0
    store = RunStore(out)
    gens = store.read_generations()
    assert sorted(g.prompt_id for g in gens.values()) == sorted(
        f"{cat}-{label}-0"
        for cat in ("violence", "self-harm", "sexual")
        for label in ("benign", "unsafe")
    )
    assert store.read_manifest()["per_category"] == 1
    assert main([*args, "--out", str(out), "-q"]) == 0
    assert len(store.read_generations()) == 6  # the rerun found them all done
    assert main([*args[:-1], "0", "--out", str(tmp_path / "r0"), "-q"]) == 2
