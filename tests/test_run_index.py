"""The run index: what it holds agrees with `store.read_run`, it is rebuilt when the run's files
change, written atomically, built streaming, and indexes read-only runs privately."""

from __future__ import annotations

import json
import threading
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

from t2i_eval import run_index
from t2i_eval.errors import UserError
from t2i_eval.run_index import open_index
from t2i_eval.stats import fmt_clustered, run_table
from t2i_eval.store import RunStore, read_run
from t2i_eval.types import (
    CATEGORIES,
    LABELS,
    Generation,
    Prompt,
    StageDecision,
    Verdict,
    category_order,
)

JUDGES = {
    "blank@1": {"kind": "blank", "at": "2026-01-01T00:00:00"},  # older: not the one used
    "blank@2": {"kind": "blank", "at": "2026-02-01T00:00:00"},
    "sanity@1": {"role": "sanitization", "at": "2026-02-01T00:00:00"},
    "harm@1": {"kind": "harm", "at": "2026-02-01T00:00:00"},
}


def _gen(p: Prompt, seed: int, status: str, image: bool = True) -> Generation:
    refused = status == "refused"
    d = StageDecision("prompt_guard", "blocklist", refused, float(refused), 0.0, message="m")
    return Generation(
        f"{p.id}-s{seed}",
        p.id,
        seed,
        status,  # type: ignore[arg-type]
        "prompt_guard:blocklist" if refused else None,
        (d,),
        f"images/{p.id}.png" if status == "ok" and image else None,
        "image" if status == "ok" and image else None,
        "boom" if status == "error" else None,
    )


def _every_case(root: Path) -> RunStore:
    """A run with every case the outcome rule and `read_run` distinguish: three seeds, two rank
    files, an error retried and a result not replaced by a later error, two blank judges (the
    most recent used), flagged/unsure/missing blank verdicts, a verdict written twice, a
    sanitization and a harm judge, a guards-only record, a foreign category and rewritten
    prompts (parent in the run, and parent elsewhere)."""
    store = RunStore(root)
    root.mkdir(parents=True)
    cats = [*CATEGORIES[:3], "zz_foreign"]
    prompts = [Prompt(f"p{i}", f"prompt {i % 5}", cats[i % 4], LABELS[i % 2]) for i in range(12)]
    prompts += [
        Prompt("r1", "rewritten prompt 1", cats[1], "unsafe", parent_id="p1"),
        Prompt("r9", "rewritten elsewhere", cats[0], "benign", parent_id="p_not_here"),
    ]
    store.write_manifest(
        {"suite": {"name": "s"}, "system": {"name": "x"}, "status": "complete", "judges": JUDGES}
    )
    store.write_prompts(prompts)
    gens0, gens1 = [], []
    for i, p in enumerate(prompts):
        for seed in range(3):
            status = ("ok", "refused", "ok", "error")[(i + seed) % 4]
            (gens0 if seed < 2 else gens1).append(_gen(p, seed, status, image=i != 5))
    p = prompts[0]
    gens1.append(_gen(p, 1, "ok"))  # rank 1 retries seed 1 of p0 (an error in rank 0)
    gens1.append(_gen(p, 0, "error"))  # an error never replaces a result
    store.append_generations(gens0, rank=0)
    store.append_generations(gens1, rank=1)
    oks = [g for g in gens0 + gens1 if g.status == "ok"]
    store.append_verdicts("blank@1", [Verdict(g.record_id, "blank@1", True) for g in oks])
    blank = [
        Verdict(g.record_id, "blank@2", (False, True, None)[k % 3], float(k), 1.0, reason="r")
        for k, g in enumerate(oks[:-2])  # the last two: no verdict (unjudged)
    ]
    blank.append(replace(blank[0], flagged=True))  # written twice: the last line wins
    store.append_verdicts("blank@2", blank)
    store.append_verdicts(
        "sanity@1", [Verdict(g.record_id, "sanity@1", k % 2 == 0) for k, g in enumerate(oks)]
    )
    store.append_verdicts("harm@1", [Verdict(g.record_id, "harm@1", False) for g in oks[:3]])
    return store


def test_the_index_holds_what_read_run_decides(tmp_path):
    store = _every_case(tmp_path / "run")
    data = read_run(store.root)
    index = open_index(store.root)
    gens = store.read_generations()
    assert data.outcomes and index.judge_keys == data.judge_keys
    for rid, (out, cause) in data.outcomes.items():
        found = index.record(rid)
        assert (found.outcome, found.cause) == (out, cause), rid
        assert found.gen == gens[rid]  # the latest record, as the store reads it
        want = {role: v[rid] for role, v in data.verdicts.items() if rid in v}
        assert found.verdicts == want
        assert found.text == data.prompts_by_id[found.gen.prompt_id].text
    assert index.record("nope") is None and index.generation("../manifest.json") is None

    table, summary = run_table(data), index.summary()
    assert summary.categories == table.categories
    for cat in table.categories:
        for label in LABELS:
            assert fmt_clustered(summary.cell(cat, label)) == fmt_clustered(
                table.cell(cat, label).refusal
            )
    for label in LABELS:
        want, got = table.micro(label).refusal, summary.micro[label]
        assert (got.k, got.n, got.clusters, got.deff) == (want.k, want.n, want.clusters, want.deff)
        assert fmt_clustered(got) == fmt_clustered(want)


def test_rows_are_one_per_root_prompt_and_seed_in_the_pages_order(tmp_path):
    store = _every_case(tmp_path / "run")
    data = read_run(store.root)
    index = open_index(store.root)
    rows = index.conn.execute("SELECT root, seed, category, text, rid FROM rows ORDER BY pos")
    rows = rows.fetchall()
    by_id = data.prompts_by_id
    # r1 is a rewrite of p1 (here): it shares p1's rows; r9's parent is elsewhere: its own root
    keys = {(g.prompt_id if g.prompt_id != "r1" else "p1", g.seed) for g in data.gens.values()}
    keys = {("p_not_here", s) if p == "r9" else (p, s) for p, s in keys}
    assert {(r[0], r[1]) for r in rows} == keys and len(rows) == len(keys)
    order = {c: i for i, c in enumerate(category_order(p.category for p in by_id.values()))}
    assert [(order[r[2]], r[2], r[3], r[1]) for r in rows] == sorted(
        (order[r[2]], r[2], r[3], r[1]) for r in rows
    )
    shown = {(r[0], r[1]): r for r in rows}
    assert shown[("p_not_here", 0)][3] == "rewritten elsewhere"  # no root here: its own text
    assert shown[("p1", 0)][3] == "prompt 1"  # the root's text, though r1 also answers p1
    assert shown[("p1", 0)][4] == "r1-s0"  # the key's last record


def test_changed_records_or_verdicts_rebuild_the_index(tmp_path):
    store = _every_case(tmp_path / "run")
    first = open_index(store.root)
    inode = store.index_path.stat().st_ino
    assert open_index(store.root).stamp == first.stamp  # unchanged: reused, not rebuilt
    assert store.index_path.stat().st_ino == inode
    rid = next(r for r, (o, _) in read_run(store.root).outcomes.items() if o == "complied")
    store.append_verdicts("blank@2", [Verdict(rid, "blank@2", True, 0.0, 1.0, reason="black")])
    again = open_index(store.root)
    assert again.record(rid).outcome == "blocked" and again.stamp != first.stamp
    assert store.index_path.stat().st_ino != inode  # a new file, renamed into place
    assert first.record(rid).outcome == "complied"  # an open index reads the file it opened
    g = replace(again.record(rid).gen, record_id="late", seed=9)
    store.append_generations([g], rank=2)
    late = open_index(store.root).record("late")
    assert (late.outcome, late.cause) == read_run(store.root).outcome("late")


def test_a_failed_build_keeps_the_previous_index_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = _every_case(tmp_path / "run")
    open_index(store.root)
    before = store.index_path.read_bytes()
    store.append_verdicts("harm@1", [Verdict("p1-s0", "harm@1", True)])

    def crash(conn):
        raise KeyboardInterrupt  # killed midway through writing the rows

    monkeypatch.setattr(run_index, "_index_rows", crash)
    with pytest.raises(KeyboardInterrupt):
        open_index(store.root)
    assert store.index_path.read_bytes() == before
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".index")] == []


def test_two_builders_at_once_both_get_a_whole_index(tmp_path, monkeypatch):
    store = _every_case(tmp_path / "run")
    both_building = threading.Barrier(2, timeout=60)
    real = run_index._index_rows

    def rows_together(conn):
        both_building.wait()  # neither finishes before the other has started writing
        real(conn)

    monkeypatch.setattr(run_index, "_index_rows", rows_together)
    found: list[int] = []
    threads = [
        threading.Thread(target=lambda: found.append(open_index(store.root).rows)) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 2 and found[0] == found[1] == open_index(store.root).rows > 0
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".index")] == []


def test_damaged_records_are_refused_as_read_run_refuses_them(tmp_path):
    store = _every_case(tmp_path / "run")
    path = store.generations_path(0)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b'{"record_id": "x", "seed": "zero"}', *lines[1:]]))
    with pytest.raises(UserError) as want:
        read_run(store.root)
    with pytest.raises(UserError) as got:
        open_index(store.root)
    assert str(got.value) == str(want.value) and "line 2" in str(got.value)
    assert not store.index_path.exists()
    path.write_bytes(b"\n".join(lines) + b'{"record_id": "torn')  # a torn last line: dropped
    assert open_index(store.root).record("p0-s0") is not None


def test_a_damaged_or_foreign_index_file_is_rebuilt(tmp_path):
    store = _every_case(tmp_path / "run")
    store.index_path.write_bytes(b"not a database" * 100)
    assert open_index(store.root).rows > 0
    open_index(store.root).conn.close()
    import sqlite3

    conn = sqlite3.connect(store.index_path)
    conn.execute("UPDATE meta SET value = '0' WHERE key = 'version'")
    conn.commit()
    conn.close()
    assert open_index(store.root).rows > 0  # another version: rebuilt


def test_a_read_only_run_folder_is_indexed_privately(tmp_path, monkeypatch):
    store = _every_case(tmp_path / "run")
    real, builds = run_index._aside, []

    def aside(dest: Path) -> Path:
        if dest.parent == store.root:
            raise PermissionError(13, "Permission denied")
        builds.append(dest)
        return real(dest)

    monkeypatch.setattr(run_index, "_aside", aside)
    index = open_index(store.root)
    assert not store.index_path.exists() and index.path.parent == run_index._private_folder()
    assert open_index(store.root).path == index.path and len(builds) == 1  # reused


def _guards_run(root: Path, n: int) -> int:
    """A guards-only run of `n` records shaped like `--system guards` writes them (raw scores
    per category); returns the size of its record file."""
    store = RunStore(root)
    root.mkdir(parents=True)
    prompts = [Prompt(f"p{i}", f"prompt {i}", CATEGORIES[i % 9], LABELS[i % 2]) for i in range(n)]
    store.write_manifest({"suite": {"name": "s"}, "system": {"name": "g"}, "status": "complete"})
    store.write_prompts(prompts)
    raw = {"max_cos": dict.fromkeys(CATEGORIES, 0.25), "nearest": dict.fromkeys(CATEGORIES, "x")}
    d = StageDecision("prompt_guard", "concept", False, 0.0, 0.5, raw)
    store.append_generations(
        Generation(f"g{i}", p.id, 0, "ok", None, (d,) * 3) for i, p in enumerate(prompts)
    )
    return store.generations_path(0).stat().st_size


def test_the_build_streams_records(tmp_path):
    """Peak Python memory while indexing grows by far less per record than a record's line:
    holding the records would cost about a line's bytes each as decoded JSON, and at least a
    few hundred bytes each as compact `Record`s (a tenth of a line here); what may grow is the
    summary's few numbers per prompt."""
    _guards_run(tmp_path / "warm-up", 10)
    open_index(tmp_path / "warm-up")  # one-time costs (imports, caches) out of the way
    peaks, sizes = [], []
    for n in (300, 1200):
        sizes.append(_guards_run(tmp_path / str(n), n))
        tracemalloc.start()
        open_index(tmp_path / str(n))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    per_record = (peaks[1] - peaks[0]) / 900
    line = (sizes[1] - sizes[0]) / 900
    assert per_record < line / 10, (per_record, line)


def test_a_finished_run_and_judge_leave_a_current_index(tmp_path, monkeypatch):
    """`run` and `judge` build the index last, so the explorer's first open builds nothing."""
    from t2i_eval.judging import judge_all
    from t2i_eval.runner import run
    from t2i_eval.systems import parse_system
    from t2i_eval.types import Suite

    suite = Suite("s", tuple(Prompt(f"p{i}", f"a knife {i}", "violence", "benign") for i in range(4)))
    out = run(suite, parse_system("blocklist"), out=tmp_path / "run", progress=False).run_dir
    store = RunStore(out)
    assert store.index_path.is_file()
    built = []
    monkeypatch.setattr(run_index, "_build", lambda *a: built.append(a))
    open_index(out).close()
    assert built == []  # current: opened, not rebuilt
    monkeypatch.undo()
    list(judge_all(out, ["blank"]))  # the manifest changed: the index is brought up to date
    monkeypatch.setattr(run_index, "_build", lambda *a: built.append(a))
    index = open_index(out)
    assert built == [] and index.stamp == run_index.run_stamp(store)
    index.close()


def test_located_records_point_at_their_own_lines(tmp_path):
    """The index finds a record again by (offset, length): across chunks, blank lines and a
    last line without its newline, each place holds exactly that record's line."""
    from t2i_eval.store import CHUNK, CompactReader, Record, located_records

    p = Prompt("p", "t", "violence", "benign")
    store = RunStore(tmp_path)
    store.append_generations(_gen(p, s, "ok") for s in range(CHUNK + 3))
    path = store.generations_path(0)
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    lines.insert(5, b"\n")
    data = b"".join(lines).rstrip(b"\n")  # the last record kept, its newline lost
    path.write_bytes(data)
    got = list(located_records(path, Record))
    assert [g.seed for _, _, g in got] == list(range(CHUNK + 3))
    for at, length, g in got:
        assert data[at : at + length] == data[at : at + length].strip()
        assert CompactReader().parse(json.loads(data[at : at + length])) == g
