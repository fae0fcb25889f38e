"""Batch backoff on out-of-memory, and multi-process runs (2 CPU ranks through torchrun)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from t2i_eval.runner import Ranks, run
from t2i_eval.store import RunStore
from t2i_eval.suites import load_suite
from t2i_eval.systems import parse_system


def _spec(tmp_path, **opts):
    p = tmp_path / "fake.yaml"
    p.write_text("generator: {name: fake" + "".join(f", {k}: {v}" for k, v in opts.items()) + "}\n")
    return parse_system(str(p))


def test_out_of_memory_halves_the_batch_and_records_it(tmp_path):
    res = run(
        load_suite("core"),
        _spec(tmp_path, oom_above=2),
        out=tmp_path / "r",
        limit=20,
        batch_size=8,
        progress=False,
    )
    gens = RunStore(res.run_dir).read_generations()
    assert len(gens) == 20 and {g.status for g in gens.values()} == {"ok"}
    m = RunStore(res.run_dir).read_manifest()
    assert [(b["from"], b["to"]) for b in m["batch_backoffs"]] == [(8, 4), (4, 2)]


def test_out_of_memory_at_batch_one_is_an_error_not_a_loop(tmp_path):
    res = run(
        load_suite("core"),
        _spec(tmp_path, oom_above=0),
        out=tmp_path / "r",
        limit=2,
        batch_size=2,
        progress=False,
    )
    gens = RunStore(res.run_dir).read_generations()
    assert {g.status for g in gens.values()} == {"error"} and res.failed == 2
    assert all("out of memory" in g.error for g in gens.values())


def test_rank_shares_are_a_stable_partition():
    ids = [f"{i:016x}" for i in range(0, 10_000, 7)]
    shares = [[r for r in ids if Ranks(k, 3).owns(r)] for k in range(3)]
    assert sorted(sum(shares, [])) == sorted(ids) and all(shares)


def test_compile_flag_reaches_the_generator(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    import torch

    from t2i_eval.cli import main

    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)  # compiling itself is slow on CPU
    out = tmp_path / "r"
    assert (
        main(["run", "--system", "tiny", "--limit", "2", "--compile", "--out", str(out), "-q"]) == 0
    )
    info = next(
        c["info"]
        for c in json.loads((out / "manifest.json").read_text())["components"]
        if c["stage"] == "generator"
    )
    assert info["compiled"] is True and info["attention"] == "AttnProcessor2_0"


def _torchrun(args, env, **kw):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "t2i_eval",
        *args,
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw
    )


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers need not share its process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(pid: int) -> None:
    for p in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _records(run_dir: Path) -> dict:
    out = {}
    for f in sorted((run_dir / "generations").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            d = json.loads(line)
            image = (run_dir / d["image_path"]).read_bytes() if d["image_path"] else None
            out.setdefault(d["record_id"], []).append((d["status"], d["refused_by"], image))
    return out


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_after_a_kill(tmp_path):
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    system = tmp_path / "s.yaml"
    system.write_text("prompt_guards: [blocklist]\ngenerator: {name: fake, delay: 0.05}\n")
    args = ["run", "--system", str(system), "--limit", "60", "--batch-size", "4", "-q"]
    single = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "t2i_eval", *args, "--out", str(single)],
        env=env,
        check=True,
        capture_output=True,
    )
    double = tmp_path / "two"
    proc = _torchrun([*args, "--out", str(double)], env)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill both ranks once each has stored some records
        files = list((double / "generations").glob("rank-*.jsonl"))
        if len(files) == 2 and all(len(f.read_text().splitlines()) >= 4 for f in files):
            break
        time.sleep(0.2)
    _kill_tree(proc.pid)  # SIGKILL the launcher and both ranks, mid-run
    proc.wait()
    time.sleep(0.5)
    partial = _records(double)
    assert 0 < len(partial) < 60
    done = _torchrun([*args, "--out", str(double)], env)
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out.decode()[-2000:]
    assert f"({60 - len(partial)} generated, {len(partial)} already done)" in out.decode()
    a, b = _records(single), _records(double)
    assert all(len(v) == 1 for v in b.values())  # no duplicates across both rank files
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}  # item for item
    m = json.loads((double / "manifest.json").read_text())
    assert m["status"] == "complete" and m["world_size"] == 2
    assert "| violence |" in (double / "report" / "report.md").read_text()  # rank 0 reported
