"""Crash safety: SIGKILL a real `t2i-eval run` at random points and resume it each time; a torn
last record line; a manifest that says running / complete / failed / interrupted truthfully."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from t2i_eval.cli import main
from t2i_eval.runner import plan, run
from t2i_eval.store import RunStore
from t2i_eval.suites import load_suite
from t2i_eval.systems import parse_system

KILL_SEED = 20240611
N_PROMPTS, SEEDS, BATCH = 36, 2, 3
TOTAL = N_PROMPTS * SEEDS

# `python -m t2i_eval`, with two race windows held open so that kills can land inside them: a
# PNG's temp file (complete, not yet renamed into place) waits 50 ms before its fsync, an
# appended verdict chunk 300 ms (the run's last moments before "complete": a kill there must
# still find "running"). Nothing else changes; the code under test is the installed CLI.
WIDE_WINDOWS = """
import os, sys, time
_fsync = os.fsync
def _slow_fsync(fd):
    name = os.readlink(f"/proc/self/fd/{fd}")
    if "/images/." in name:
        time.sleep(0.05)
    elif "/verdicts/" in name:
        time.sleep(0.3)
    _fsync(fd)
os.fsync = _slow_fsync
from t2i_eval.cli import main
code = main(sys.argv[1:])
print(f"torch imported: {'torch' in sys.modules}", file=sys.stderr)  # a start stays cheap
sys.exit(code)
"""


def _suite_file(path: Path) -> Path:
    """N_PROMPTS prompts; every sixth holds the fake generator's refusal word (no image)."""
    rows = [
        {
            "prompt": f"scene {i}: a lighthouse at dusk" + (" forbidden" if i % 6 == 0 else ""),
            "category": ("violence", "self_harm", "privacy_public")[i % 3],
            "label": "benign" if i % 2 else "unsafe",
        }
        for i in range(N_PROMPTS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _complete_lines(path: Path) -> list[bytes]:
    """Lines a reader would take now (a line still being appended has no newline yet)."""
    if not path.exists():
        return []
    return path.read_bytes().split(b"\n")[:-1]


def _partial_images(out: Path) -> list[Path]:
    folder = out / "images"
    return [p for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> bool:
    """Poll the run directory until `ready()`, then SIGKILL; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"kill point not reached in {timeout} s")
        time.sleep(0.001)
    proc.kill()  # SIGKILL: no handler, no finally block, no flush
    proc.wait()
    return True


def _kill_plan(rng: random.Random) -> list[tuple[str, int]]:
    """12 kills at increasing random record counts, 4 of them held until an image write is in
    flight (its temp file exists), then 2 during the judge pass."""
    counts = sorted(rng.sample(range(1, TOTAL - 4 * BATCH), 12))
    mid_write = set(rng.sample(range(12), 4))
    gen = [("image-write" if i in mid_write else "records", c) for i, c in enumerate(counts)]
    return [*gen, ("judge", 0), ("judge", 0)]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    gens_file = out / "generations" / "rank-0.jsonl"
    verdicts_file = out / "verdicts" / "blank@2.jsonl"
    suite = _suite_file(tmp_path / "suite.jsonl")
    system = tmp_path / "fake.yaml"
    system.write_text("generator: {name: fake, mode: noise, size: 64, refuse_words: [forbidden]}\n")
    args = ["run", "--suite", str(suite), "--system", str(system), "--seeds", str(SEEDS)]
    args += ["--batch-size", str(BATCH), "-q"]
    cmd = [sys.executable, "-c", WIDE_WINDOWS, *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    kills = _kill_plan(random.Random(KILL_SEED))
    print(f"kill plan (seed {KILL_SEED}): {kills}")
    landed: list[dict] = []
    start = time.monotonic()
    for n, (kind, target) in enumerate(kills):
        before = len(_complete_lines(gens_file))
        verdicts_before = len(_complete_lines(verdicts_file))
        goal = max(target, before + 1)  # at least one new batch stored per start
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kind == "records":
            hit = _kill_when(proc, lambda g=goal: len(_complete_lines(gens_file)) >= g)
        elif kind == "image-write":
            hit = _kill_when(
                proc,
                lambda g=goal: len(_complete_lines(gens_file)) >= g and bool(_partial_images(out)),
            )
        else:
            hit = _kill_when(
                proc, lambda v=verdicts_before: len(_complete_lines(verdicts_file)) > v
            )
        with proc.stderr:
            assert hit, f"kill {n} ({kind}): run ended before the kill: {proc.stderr.read()}"
        records = _complete_lines(gens_file)
        landed.append(
            {
                "kill": n,
                "kind": kind,
                "target": goal,
                "records": len(records),
                "partial_images": len(_partial_images(out)),
                "verdicts": len(_complete_lines(verdicts_file)),
            }
        )
        raw = json.loads((out / "manifest.json").read_text())
        assert raw["status"] == "running", landed[-1]  # nobody wrote anything after the kill
        assert (raw["pid"], raw["host"]) == (proc.pid, socket.gethostname())
        seen = RunStore(out).read_manifest()
        assert seen["status"] == "interrupted" and f"process {proc.pid}" in seen["error"]
        if kind != "judge":
            assert len({json.loads(x)["record_id"] for x in records}) < TOTAL, landed[-1]
        if n == 0:  # the report tells the reader, too
            assert main(["report", str(out)]) == 0
            report = capsys.readouterr().out  # the status and why the run did not finish
            assert "(status: interrupted: " in report and f"process {proc.pid}" in report

    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    print(f"{len(kills)} kills + final run in {elapsed:.1f} s; kill points: {landed}")
    assert final.returncode == 0, final.stderr[-2000:]
    assert f"(0 generated, {TOTAL} already done)" in final.stdout
    assert "torch imported: False" in final.stderr

    # every kill landed mid-run: generation kills left items undone, judge kills left the
    # generation complete and the manifest not yet final
    gen_kills = [k for k in landed if k["kind"] != "judge"]
    assert all(0 < k["records"] < TOTAL for k in gen_kills)
    assert any(k["partial_images"] for k in gen_kills if k["kind"] == "image-write")
    judge_kills = [k for k in landed if k["kind"] == "judge"]
    assert all(k["records"] >= TOTAL and k["verdicts"] > 0 for k in judge_kills)

    # exactly one record line per planned (prompt, seed): nothing lost, nothing twice
    lines = _complete_lines(gens_file)
    assert gens_file.read_bytes().endswith(b"\n")
    records = [json.loads(x) for x in lines]
    planned = {it.record_id for it in plan(load_suite(str(suite)), SEEDS, None)}
    ids = Counter(r["record_id"] for r in records)
    assert set(ids) == planned and set(ids.values()) == {1}

    # every image a record names opens; no image without a record, no temp file left behind
    texts = {p.id: p.text for p in RunStore(out).read_prompts()}
    named = set()
    for r in records:
        assert r["status"] == ("refused" if "forbidden" in texts[r["prompt_id"]] else "ok"), r
        if r["image_path"]:
            named.add(r["image_path"])
            with Image.open(out / r["image_path"]) as img:
                img.load()
                assert img.size == (64, 64)
    assert {f"images/{p.name}" for p in (out / "images").iterdir()} == named

    # one verdict per delivered image, although a judge pass was killed twice
    verdicts = Counter(json.loads(x)["record_id"] for x in _complete_lines(verdicts_file))
    assert set(verdicts) == {r["record_id"] for r in records if r["status"] == "ok"}
    assert set(verdicts.values()) == {1}

    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["error"] is None
    assert len(m["history"]) == len(kills) + 1  # every start is on record

    # and the result is the one an uninterrupted run gives, image for image
    clean = tmp_path / "clean"
    assert main([*args, "--out", str(clean)]) == 0
    assert _outcomes(clean) == _outcomes(out)


def _outcomes(out: Path) -> dict:
    store = RunStore(out)
    return {
        rid: (g.status, g.refused_by, (out / g.image_path).read_bytes() if g.image_path else None)
        for rid, g in store.read_generations().items()
    }


def test_torn_last_line_is_dropped_with_a_warning_and_redone(tmp_path):
    suite = _suite_file(tmp_path / "suite.jsonl")
    out = tmp_path / "run"
    args = ["run", "--suite", str(suite), "--system", "fake", "--limit", "8", "-q"]
    assert main([*args, "--out", str(out)]) == 0
    gens_file = out / "generations" / "rank-0.jsonl"
    lines = gens_file.read_bytes().split(b"\n")[:-1]
    torn = json.loads(lines[-1])["record_id"]
    # a process killed half-way through appending its last record
    gens_file.write_bytes(
        b"".join(x + b"\n" for x in lines[:-1]) + lines[-1][: len(lines[-1]) // 2]
    )

    proc = subprocess.run(
        [sys.executable, "-m", "t2i_eval", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    warning = f"{gens_file}: dropped a torn last line"
    assert proc.stderr.count(warning) == 1, proc.stderr
    assert "(1 generated, 7 already done)" in proc.stdout  # the torn record, and only it, redone
    after = gens_file.read_bytes()
    assert after.endswith(b"\n")
    ids = [json.loads(x)["record_id"] for x in after.split(b"\n")[:-1]]  # every line parses
    assert ids.count(torn) == 1 and len(ids) == len(set(ids)) == 8


def _fake_spec(tmp_path: Path):
    p = tmp_path / "fake.yaml"
    p.write_text("generator: {name: fake}\n")
    return parse_system(str(p))


def test_manifest_says_running_with_pid_and_host_then_complete(tmp_path, monkeypatch):
    from t2i_eval.systems import fake

    out, seen = tmp_path / "run", []
    orig = fake.FakeGenerator.generate

    def watch(self, texts, seeds):
        seen.append(RunStore(out).read_manifest())
        return orig(self, texts, seeds)

    monkeypatch.setattr(fake.FakeGenerator, "generate", watch)
    suite = load_suite(str(_suite_file(tmp_path / "s.jsonl")))
    run(suite, _fake_spec(tmp_path), out=out, limit=4, batch_size=2, progress=False)
    assert seen and {m["status"] for m in seen} == {"running"}
    assert (seen[0]["pid"], seen[0]["host"]) == (os.getpid(), socket.gethostname())
    m = RunStore(out).read_manifest()
    assert m["status"] == "complete" and m["error"] is None


def test_manifest_says_failed_with_the_error(tmp_path, monkeypatch):
    import t2i_eval.judging

    def broken(*a, **kw):
        raise RuntimeError("verdict disk full")

    monkeypatch.setattr(t2i_eval.judging, "judge_run", broken)
    suite = load_suite(str(_suite_file(tmp_path / "s.jsonl")))
    with pytest.raises(RuntimeError):
        run(suite, _fake_spec(tmp_path), out=tmp_path / "run", limit=4, progress=False)
    m = RunStore(tmp_path / "run").read_manifest()
    assert m["status"] == "failed" and m["error"] == "RuntimeError: verdict disk full"


def test_ctrl_c_says_interrupted(tmp_path, monkeypatch):
    from t2i_eval.systems import fake

    def stop(self, texts, seeds):
        raise KeyboardInterrupt

    monkeypatch.setattr(fake.FakeGenerator, "generate", stop)
    suite = load_suite(str(_suite_file(tmp_path / "s.jsonl")))
    with pytest.raises(KeyboardInterrupt):
        run(suite, _fake_spec(tmp_path), out=tmp_path / "run", limit=4, progress=False)
    m = RunStore(tmp_path / "run").read_manifest()
    assert m["status"] == "interrupted" and "rerun the same command" in m["error"]


def test_stale_running_manifest_reads_as_interrupted(tmp_path):
    """What a reader sees after a SIGKILL, without killing anything: the pid in the manifest
    is dead, belongs to another host, is alive, or was reused by a later process."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = RunStore(tmp_path)
    base = {"status": "running", "suite": {"digest": "s"}, "system": {"digest": "y"}}
    here = socket.gethostname()

    def status(**writer):
        store.write_manifest({**base, **writer})
        return store.read_manifest()["status"]

    assert status(pid=dead.pid, host=here) == "interrupted"
    assert f"process {dead.pid} on {here}" in store.read_manifest()["error"]
    assert status(pid=dead.pid, host="another-host") == "running"  # cannot tell from here
    assert status(pid=os.getpid(), host=here) == "running"
    assert status(pid=os.getpid(), host=here, pid_start="1") == "interrupted"  # pid reused
    assert status() == "running"  # a manifest without a pid says nothing about its process
    store.write_manifest({**base, "status": "complete", "pid": dead.pid, "host": here})
    assert store.read_manifest()["status"] == "complete"  # only "running" can be stale
