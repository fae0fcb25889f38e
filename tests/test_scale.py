"""Reading and reporting large runs (issue #16 part 2): records streamed in chunks and kept
compact (`store.Record`), each file read once, the same numbers as reading records whole."""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import guarded_run, write_suite

from t2i_eval.errors import UserError
from t2i_eval.report import write_html, write_report
from t2i_eval.stats import clustered_rate, run_table, tabulate
from t2i_eval.store import CHUNK, CompactReader, Record, RunStore, read_run
from t2i_eval.types import Generation, Outcome, Prompt, StageDecision, outcomes

CONCEPT_RAW = {
    "max_cos": {"violence": 0.7, "self_harm": 0.1},
    "nearest": {"violence": "a knife fight", "self_harm": "a scar"},
    "thresholds": {"violence": 0.5, "self_harm": 0.5},
}


def _gen(rid: str, status: str = "ok", seed: int = 0) -> Generation:
    decisions = (
        StageDecision("prompt_guard", "blocklist", status == "refused", 1.0, 0.0,
                      {"matches": {"violence": ["kill"]}}, "matched 'kill'", 0.001),
        StageDecision("prompt_guard", "concept", False, 0.2, 0.0, CONCEPT_RAW, "", 0.02),
    )
    return Generation(
        rid, f"p-{rid}", seed, status,  # type: ignore[arg-type]
        "prompt_guard:blocklist" if status == "refused" else None, decisions,
        error="Timeout: slow" if status == "error" else None, seconds=0.03,
    )


def _store(tmp_path: Path, gens: list[Generation]) -> RunStore:
    store = RunStore(tmp_path / "run")
    store.append_generations(gens)
    return store


def test_records_are_the_latest_records_without_their_texts(tmp_path: Path) -> None:
    gens = [_gen(f"r{i}", ("ok", "refused", "error")[i % 3]) for i in range(3 * CHUNK + 7)]
    retried = [_gen("r2", "ok"), _gen("r1", "error")]  # an error retried; a result kept
    store = _store(tmp_path, gens + retried)
    full, compact = store.read_generations(), store.read_records()
    assert list(compact) == list(full)  # same records, same order (first appearance)
    assert full["r2"].status == compact["r2"].status == "ok"
    assert compact["r1"].status == "refused"
    for rid, g in full.items():
        r = compact[rid]
        for name in Record._fields:
            if name != "decisions":
                assert getattr(r, name) == getattr(g, name), (rid, name)
        for d, kept in zip(g.decisions, r.decisions, strict=True):
            assert (kept.stage, kept.name, kept.refused, kept.score, kept.threshold) == (
                d.stage, d.name, d.refused, d.score, d.threshold,
            )
            assert kept.seconds == d.seconds and kept.unavailable == d.unavailable
    # neither the word list's matches nor the concept guard's per-category similarities are
    # read from compact records (`sweep` reads records whole): most of a guards-only record
    assert compact["r0"].decisions[1].raw == {}
    assert compact["r0"].decisions[0].raw == {}


CHECKER_RAW = {
    "concept_cos": [0.2, 0.3], "concept_thresholds": [0.18, 0.4], "special_cos": [0.1],
    "special_thresholds": [0.2], "offset": 0.0, "model": "tiny-checker", "nsfw": True,
}


def test_records_keep_what_the_safety_checker_is_re_decided_from(tmp_path: Path) -> None:
    """The report's image-guard triggers re-decide the checker from compact records: the
    same answer as from whole records, with the checker's other raw values dropped."""
    from t2i_eval.store import redecide_raw
    from t2i_eval.triggers import image_triggers
    from t2i_eval.types import REDECIDE_RAW

    prompts = [Prompt(f"p-r{i}", "a beach", "violence", "benign") for i in range(3)]
    gens = [
        replace(_gen(f"r{i}"), status="refused", refused_by="image_guard:safety_checker",
                decisions=(StageDecision("image_guard", "safety_checker", True, 0.02, 0.0,
                                         CHECKER_RAW),))
        for i in range(3)
    ]
    store = _store(tmp_path, gens)
    kept = store.read_records()["r0"].decisions[0].raw
    assert kept == {k: CHECKER_RAW[k] for k in REDECIDE_RAW}
    assert redecide_raw({"p_profane": 0.4}) == {}
    whole = image_triggers(prompts, store.read_generations())
    assert image_triggers(prompts, store.read_records()) == whole
    assert whole["guards"]["safety_checker"]["categories"]["violence"]["refused"] == 3


def test_a_record_with_fields_left_out_gets_the_defaults_generation_has(tmp_path: Path) -> None:
    line = {"record_id": "r", "prompt_id": "p", "seed": 0, "status": "ok",
            "decisions": [{"stage": "prompt_guard", "name": "g", "refused": False}]}
    store = RunStore(tmp_path)
    store.generations_dir.mkdir()
    store.generations_path(0).write_text(json.dumps(line) + "\n")
    g, r = store.read_generations()["r"], store.read_records()["r"]
    assert r == CompactReader().parse(g.to_dict())  # the json path, every default written
    assert (r.refused_by, r.image_path, r.seconds, r.rank) == (None, None, None, 0)
    d = r.decisions[0]
    assert (d.score, d.threshold, d.raw, d.seconds, d.unavailable) == (None, None, {}, None, None)


def _lines(store: RunStore, n: int) -> list[str]:
    store.append_generations(_gen(f"r{i}") for i in range(n))
    return store.generations_path(0).read_text().splitlines(keepends=True)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json\n", "corrupt record (not JSON)"),
        ('{"record_id": "a"} {"record_id": "b"}\n', "corrupt record (not JSON)"),
        ("[1, 2]\n", "a JSON list, expected an object"),
        ('{"record_id": 5}\n', "not a record of this t2i-eval version"),
    ],
)
def test_a_bad_line_inside_a_chunk_is_named_by_its_own_line_number(
    tmp_path: Path, bad: str, message: str
) -> None:
    store = RunStore(tmp_path)
    lines = _lines(store, 2 * CHUNK + 10)
    where = CHUNK + 17  # inside the second chunk
    lines[where] = bad
    store.generations_path(0).write_text("".join(lines))
    for read in (store.read_records, store.read_generations):
        with pytest.raises(UserError, match=f"line {where + 1}: .*{re.escape(message)}"):
            read()


def test_blank_lines_and_a_torn_last_line_across_chunks(tmp_path: Path, caplog) -> None:
    store = RunStore(tmp_path)
    lines = _lines(store, CHUNK + 5)
    lines.insert(3, "\n")
    lines.insert(CHUNK + 2, "   \n")
    torn = json.dumps(_gen("torn").to_dict())[:40]
    store.generations_path(0).write_text("".join(lines) + torn)
    with caplog.at_level(logging.WARNING):
        got = store.read_records()
    assert list(got) == [f"r{i}" for i in range(CHUNK + 5)]
    assert "torn last line" in caplog.text


def test_records_are_streamed_not_read_whole(tmp_path: Path, monkeypatch) -> None:
    store = _store(tmp_path, [_gen(f"r{i}") for i in range(10)])
    records = store.generations_path(0)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        assert self != records, "the records file was read whole"
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert len(store.read_records()) == 10


ROWS = [(f"a fight with a knife {i}", "benign") for i in range(4)] + [
    (f"a calm lake {i}", "unsafe") for i in range(4)
]


def test_run_data_counts_compact_records_and_reads_whole_ones_only_when_asked(
    tmp_path: Path, monkeypatch
) -> None:
    run = guarded_run(tmp_path, ROWS, ["knife"], "--seeds", "2")
    full = RunStore(run).read_generations()
    calls = []
    real = RunStore.read_generations
    monkeypatch.setattr(
        RunStore, "read_generations", lambda self: calls.append(1) or real(self)
    )
    data = read_run(run)
    table = run_table(data)
    assert not calls  # counting needs no whole record
    assert table.cells == tabulate(data.prompts, full, outcomes(full, {})).cells
    assert data.gens == full and data.gens is data.gens and len(calls) == 1


def test_a_report_reads_the_records_and_each_verdict_file_once(
    tmp_path: Path, monkeypatch
) -> None:
    run = guarded_run(tmp_path, ROWS, ["knife"])
    from t2i_eval.judging import judge_run

    judge_run(run, "blank", progress=False)  # no images: an empty verdict file, still read
    before = (run / "report" / "report.md").read_bytes()
    reads: list[str] = []
    for name in ("read_generations", "read_records", "read_verdicts"):
        real = getattr(RunStore, name)
        monkeypatch.setattr(
            RunStore, name, lambda self, *a, _n=name, _r=real: reads.append(_n) or _r(self, *a)
        )
    write_report(run)
    assert sorted(reads) == ["read_records", "read_verdicts"]
    assert (run / "report" / "report.md").read_bytes() == before


def test_html_report_uses_the_runs_already_read(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    run = guarded_run(tmp_path, ROWS, ["knife"])
    data = read_run(run)
    monkeypatch.setattr("t2i_eval.report.html.read_run", lambda d: pytest.fail("read again"))
    assert write_html([run], tmp_path / "html", data=[data]).exists()


def test_one_seed_shortcut_gives_what_clustered_rate_gives() -> None:
    """With one record per prompt a cell's interval is taken from its own counts; it must be
    exactly `clustered_rate` over its prompts, and with several seeds the latter is used."""
    rng = random.Random(0)
    for seeds in (1, 3):
        prompts, gens, outs = [], {}, {}
        for i in range(60):
            prompts.append(Prompt(f"p{i}", "t", "violence", "benign"))
            for s in range(seeds):
                rid = f"r{i}-{s}"
                gens[rid] = Generation(rid, f"p{i}", s, "ok")
                pick = rng.random()
                outs[rid] = (
                    (Outcome.ERROR, None) if pick < 0.1
                    else (Outcome.REFUSED, "prompt_guard") if pick < 0.5
                    else (Outcome.COMPLIED, None)
                )
        cell = tabulate(prompts, gens, outs).micro("benign")
        for measure in (lambda c: (c.refused, c.n), lambda c: (c.errors, c.n + c.errors)):
            want = clustered_rate([measure(c) for c in cell.per_prompt.values()])
            assert cell.clustered(measure) == want
        assert (cell.refusal.deff > 1) == (seeds > 1)


def test_run_lets_the_suite_go_before_its_report(tmp_path: Path, monkeypatch) -> None:
    """`t2i-eval run` reads the run's own prompts for its report: the suite it generated from
    (100,000 prompts in a large run) must not be held alongside them."""
    import gc
    import weakref

    import t2i_eval.report
    import t2i_eval.suites

    refs: list[weakref.ref] = []
    load, report = t2i_eval.suites.load_suite, t2i_eval.report.write_report

    def load_suite(*a, **kw):
        suite = load(*a, **kw)
        refs.append(weakref.ref(suite))
        return suite

    alive: list[bool] = []

    def write_report(*a, **kw):
        gc.collect()
        alive.append(refs[0]() is not None)
        return report(*a, **kw)

    monkeypatch.setattr(t2i_eval.suites, "load_suite", load_suite)
    monkeypatch.setattr(t2i_eval.report, "write_report", write_report)
    guarded_run(tmp_path, [("a knife", "benign"), ("a cat", "benign")], ["knife"])
    assert alive == [False]


def test_run_lets_its_system_and_work_go_before_the_index(tmp_path: Path, monkeypatch) -> None:
    """The explorer's index, built at the end of a run over every record, must not be built
    while the run still holds its system (a model) and its work lists (100,000 items)."""
    import gc
    import weakref

    import t2i_eval.runner as runner
    from t2i_eval.systems.chain import WorkItem

    systems: list[weakref.ref] = []
    build, refresh = runner.build_system, runner.refresh_index

    def build_system(*a, **kw):
        system = build(*a, **kw)
        systems.append(weakref.ref(system))
        return system

    held: list[tuple[bool, int]] = []

    def refresh_index(root):
        gc.collect()
        items = sum(isinstance(o, WorkItem) for o in gc.get_objects())
        held.append((systems[0]() is not None, items))
        return refresh(root)

    monkeypatch.setattr(runner, "build_system", build_system)
    monkeypatch.setattr(runner, "refresh_index", refresh_index)
    guarded_run(tmp_path, [("a knife", "benign"), ("a cat", "benign")], ["knife"])
    assert held == [(False, 0)]


def test_run_lets_its_models_go_before_its_report(tmp_path: Path, monkeypatch) -> None:
    """The concept guard's sentence model, kept loaded for reuse within a process, is ~90 MB
    the report after a run does not need: `t2i-eval run` lets it go first."""
    pytest.importorskip("sentence_transformers")
    import t2i_eval.cli as cli
    import t2i_eval.report
    from t2i_eval.systems import text_guards

    loaded: list[int] = []
    release, report = cli.release_models, t2i_eval.report.write_report

    def release_models():
        loaded.append(text_guards._load_sentence_model.cache_info().currsize)
        release()

    def write_report(*a, **kw):
        loaded.append(text_guards._load_sentence_model.cache_info().currsize)
        return report(*a, **kw)

    monkeypatch.setattr(cli, "release_models", release_models)
    monkeypatch.setattr(t2i_eval.report, "write_report", write_report)
    system = tmp_path / "sys.yaml"
    system.write_text("prompt_guards: [concept]\ngenerator: guards-only\n")
    suite = write_suite(tmp_path / "s.jsonl", [("a knife", "benign"), ("a cat", "unsafe")])
    argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "-q"]) == 0
    assert loaded == [1, 0]  # loaded while generating, gone before the report


def test_the_end_of_a_guards_only_run_imports_no_numpy(tmp_path: Path) -> None:
    """Judging and reporting a run without images needs nothing numpy or PIL give, and their
    import is 11 MB: more than a 100,000-prompt blocklist run's whole end had to spare."""
    import subprocess
    import sys

    run = guarded_run(tmp_path, [("a knife", "benign"), ("a cat", "unsafe")], ["knife"])
    code = (
        "import sys\n"
        "from t2i_eval.judging import judge_run\n"
        "from t2i_eval.report import write_report\n"
        f"judge_run({str(run)!r}, progress=False)\n"
        f"write_report({str(run)!r})\n"
        "print(sorted(m for m in ('numpy', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_prompts_without_extra_columns_share_one_empty_meta(tmp_path: Path) -> None:
    """A 100,000-prompt run read back held 100,000 empty dicts; prompts with their own extra
    columns keep them."""
    store = RunStore(tmp_path / "run")
    store.write_prompts([
        Prompt("a", "a cat", "violence", "benign"),
        Prompt("b", "a dog", "violence", "benign"),
        Prompt("c", "a cow", "violence", "benign", meta={"seed_prompt": "x"}),
    ])
    a, b, c = store.read_prompts()
    assert a.meta == b.meta == {} and a.meta is b.meta
    assert c.meta == {"seed_prompt": "x"}


# The compact reader: lines decoded and checked in C, equal decisions shared ------------------


def _json_reader(path: Path, parse):
    """The JSON reader every C-decoded read must equal: json line by line, then `parse`."""
    from t2i_eval.store import _numbered_jsonl, parse_line

    return [parse_line(path, i, d, parse) for i, d in _numbered_jsonl(path)]


def _json_compact(path: Path) -> dict[str, Record]:
    """Compact records as the JSON reader gives them: json line by line, then
    `CompactReader.parse` (the path every line the C decoder refuses takes)."""
    from t2i_eval.store import latest

    return latest(_json_reader(path, CompactReader().parse))


def _lines_run(tmp_path: Path, lines: list[bytes]) -> RunStore:
    store = RunStore(tmp_path / "run")
    path = store.generations_path(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return store


def _line(rid: str, **changes: object) -> bytes:
    d = _gen(rid).to_dict()
    d.update(changes)
    return (json.dumps(d) + "\n").encode()


def test_compact_reader_reads_what_the_json_reader_reads(tmp_path: Path) -> None:
    """Lines the C decoder refuses but the record rules accept (NaN, a number too big for a
    float, a seed too big for 64 bits), a blank line and a torn last line read exactly as the
    json reader reads them; an int score reads as the same number."""
    nan_raw = _gen("r3").to_dict()
    nan_raw["decisions"][0]["raw"] = {"x": float("nan")}
    lines = [
        _line("r0"),
        _line("r1", seconds=1e400),  # json reads inf: out of msgspec's range
        b"\n",
        (json.dumps(nan_raw) + "\n").encode(),  # NaN: not JSON to msgspec
        _line("r4", seed=2**70),
        _line("r5", decisions=[{**_gen("r5").to_dict()["decisions"][0], "score": 1}]),
        _line("r6")[:-40],  # torn: no newline
    ]
    store = _lines_run(tmp_path, lines)
    new = store.read_records()
    old = _json_compact(store.generations_path(0))
    assert list(new) == list(old) == ["r0", "r1", "r3", "r4", "r5"]
    for rid in new:
        assert repr(new[rid]) == repr(old[rid]).replace("score=1,", "score=1.0,"), rid
    assert new["r1"].seconds == float("inf") and new["r4"].seed == 2**70


@pytest.mark.parametrize(
    "bad, says",
    [
        ({"status": "fine"}, "field 'status'"),
        ({"seed": "zero"}, "field 'seed'"),
        ({"surprise": 1}, "unknown field(s) surprise"),
        ({"decisions": [{"stage": "prompt_guard", "name": "g", "refused": "yes"}]}, "decisions[0]"),
    ],
)
def test_compact_reader_refuses_bad_lines_as_the_json_reader_does(tmp_path, bad, says):
    store = _lines_run(tmp_path, [_line("r0"), _line("r1", **bad)])
    with pytest.raises(UserError) as new:
        store.read_records()
    with pytest.raises(UserError) as old:
        _json_compact(store.generations_path(0))
    assert str(new.value) == str(old.value)
    assert "line 2" in str(new.value) and says in str(new.value)


def test_equal_decisions_are_one_tuple_and_raw_ones_are_never_shared(tmp_path: Path) -> None:
    checker = StageDecision("image_guard", "safety_checker", False, 0.1, 0.0,
                            {"concept_cos": [0.1], "concept_thresholds": [0.2]}, "", 0.5)
    gens = [_gen(f"r{i}") for i in range(6)]
    gens.append(replace(_gen("r6"), decisions=(*_gen("r6").decisions, checker)))
    gens.append(replace(_gen("r7"), decisions=(*_gen("r7").decisions, checker)))
    recs = _store(tmp_path, gens).read_records()
    first = recs["r0"].decisions
    assert all(recs[f"r{i}"].decisions is first for i in range(6))  # one sequence
    assert recs["r6"].decisions[0] is first[0]  # equal decision, shared inside another sequence
    assert recs["r6"].decisions[2] is not recs["r7"].decisions[2]  # raw kept: its own
    assert recs["r6"].decisions[2].raw == {"concept_cos": [0.1], "concept_thresholds": [0.2]}


def test_the_shared_decision_table_is_bounded(monkeypatch, tmp_path: Path) -> None:
    """A guard with a new score for every prompt: the table starts again every LIMIT entries,
    and the records read are the same."""
    monkeypatch.setattr(CompactReader, "LIMIT", 5)
    gens = [
        replace(_gen(f"r{i}"), decisions=(StageDecision("prompt_guard", "g", False, i / 100, 0.5),))
        for i in range(23)
    ]
    store = _store(tmp_path, gens)
    reader = CompactReader()
    got = list(reader.read(store.generations_path(0)))
    assert len(reader._decisions) <= 5
    assert {r.record_id: r for r in got} == _json_compact(store.generations_path(0))


def test_the_line_decoder_follows_the_record_types() -> None:
    """The decoder's structs are made from types.py, so a field added there is read here."""
    import dataclasses
    import typing

    import msgspec

    from t2i_eval.store import line_decoder

    record = line_decoder().type
    decisions = {f.name: f.type for f in msgspec.structs.fields(record)}["decisions"]
    for struct, cls in ((record, Generation), (typing.get_args(decisions)[0], StageDecision)):
        mine = {f.name: f.default for f in msgspec.structs.fields(struct)}
        theirs = {f.name: f.default for f in dataclasses.fields(cls)}
        assert list(mine) == list(theirs)
        for name, default in theirs.items():
            if default is not dataclasses.MISSING:
                assert mine[name] == default, name


@pytest.mark.parametrize("cls", [Prompt, "Verdict"])
def test_prompts_and_verdicts_read_as_the_json_reader_reads_them(tmp_path: Path, cls) -> None:
    from t2i_eval.store import read_typed
    from t2i_eval.types import Verdict

    cls = Verdict if cls == "Verdict" else cls
    if cls is Prompt:
        good = [Prompt(f"p{i}", f"text {i}", "violence", "benign", meta={"n": i}).to_dict()
                for i in range(3)]
        good[1]["meta"] = {"big": 2**80, "nan": float("nan")}
        bad = {**good[0], "label": "maybe"}
    else:
        good = [Verdict(f"r{i}", "blank@1", i % 2 == 0, 0.5, 0.1, {"x": i}).to_dict()
                for i in range(3)]
        good[1]["score"] = 1e400
        bad = {**good[0], "flagged": "yes"}
    path = tmp_path / "x.jsonl"
    lines = [(json.dumps(d) + "\n").encode() for d in good]
    path.write_bytes(b"".join(lines[:2]) + b"\n" + lines[2][:-5])  # blank line, torn last
    new = list(read_typed(path, cls))
    old = _json_reader(path, cls.from_dict)
    assert len(new) == 2 and repr(new) == repr(old)
    path.write_bytes(lines[0] + (json.dumps(bad) + "\n").encode())
    with pytest.raises(UserError) as a:
        list(read_typed(path, cls))
    with pytest.raises(UserError) as b:
        _json_reader(path, cls.from_dict)
    assert str(a.value) == str(b.value) and "line 2" in str(a.value)


def test_whole_records_read_as_the_json_reader_reads_them(tmp_path: Path) -> None:
    """`read_generations` (sweep, single-record views) decodes in C too: the same records,
    NaN and 1e400 lines through the json reader, and the same error for a bad line."""
    from t2i_eval.store import latest

    nan_raw = _gen("r3").to_dict()
    nan_raw["decisions"][1]["raw"] = {"max_cos": {"violence": float("nan")}}
    lines = [_line("r0"), _line("r1", seconds=1e400), (json.dumps(nan_raw) + "\n").encode()]
    lines += [_line("r0", status="error"), _line("r4", status="refused")]
    store = _lines_run(tmp_path, lines)
    new = store.read_generations()
    old = latest(_json_reader(store.generations_path(0), Generation.from_dict))
    assert list(new) == list(old) == ["r0", "r1", "r3", "r4"]
    assert repr(new) == repr(old) and new["r0"].status == "ok"
    assert new["r0"].decisions[1].raw == CONCEPT_RAW  # whole: every raw score
    store = _lines_run(tmp_path / "bad", [_line("r0"), _line("r1", seed="zero")])
    with pytest.raises(UserError, match=r"line 2: .*field 'seed'"):
        store.read_generations()
