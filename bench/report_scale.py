"""`t2i-eval report` at 10,000 and 100,000 records, side by side with merely parsing the records.

    .venv/bin/python bench/report_scale.py [--records 10000 --records 100000] [--run-records N]
        [--run-system blocklist|guards]

For each size it writes a synthetic guards-only run (`explorer_speed.write_run`: every record
carries three prompt guards' decisions as `--system guards` writes them, about 2 KB a line; every
3rd prompt refused), then measures, each in a fresh process as a user runs it:

- raw parse: `json.loads` of every line of the records file, the least any report must do;
- `t2i-eval report RUN`: wall time (best of 3) and peak resident memory of the process;
- `t2i-eval report RUN --html`: the same, once.

Targets (issue #16): the report at most 3x the raw parse, under 400 MB at 100,000 records.

Then the end of a run against its generation phase: a guards-only run of `--run-records`
prompts (0 skips it) through `--run-system` (default `blocklist`, the hardest case: generating
holds no model, so the end's tables weigh most; `guards` is the issue's own run, the concept
guard's model included, about 45 minutes at 100,000 prompts) generates, then indexes, judges and
writes its report as `t2i-eval run` does; the process's peak memory is read when generating is
done (before the explorer's index is built), over the index build, and over judging and the
report (each phase's own peak where the OS lets a process reset it). Target: the end peaks no
higher than generating (ratio <= 1.00).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from explorer_speed import write_run  # noqa: E402

from t2i_eval.store import RunStore  # noqa: E402

#: The child that times the raw parse: the loop only (interpreter start and imports excluded).
RAW_PARSE = """
import json, sys, time
t = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    for line in f:
        json.loads(line)
print(time.perf_counter() - t)
"""

#: The child that runs a `blocklist` guards-only run, then its end (judge + report) as
#: `t2i-eval run` does; prints the peak MB of generating, of the index build and of judging and
#: the report, and whether those are each phase's own peak. Generating ends where the runner
#: refreshes the explorer's index (`runner.refresh_index`, the first of the run's closing steps),
#: so the index build counts as the end, not as generation. On Linux the process resets its
#: peak (VmHWM, via /proc/self/clear_refs) between phases, so each phase shows its own peak and
#: the margin under generation; elsewhere the peaks are cumulative (ru_maxrss), and the end can
#: only show as no higher than generating.
RUN_PHASES = """
import resource, sys
import t2i_eval.runner as runner
from t2i_eval.cli import release_models
from t2i_eval.judging import judge_run
from t2i_eval.report import write_report
from t2i_eval.systems import parse_system
from t2i_eval.types import CATEGORIES, Prompt, Suite

def peak():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

generated, own = [], []
refresh = runner.refresh_index
def refresh_after_generating(root):
    generated.append(peak())
    own.append(reset())
    refresh(root)
runner.refresh_index = refresh_after_generating

n, out, system = int(sys.argv[1]), sys.argv[2], sys.argv[3]
words = ("a stage actor pretends to kill", "a quiet harbour at dawn", "a knife on a table")
suite = Suite("scale", tuple(
    Prompt(f"p{i}", f"{words[i % 3]}, picture {i}", CATEGORIES[i % 9], ("benign", "unsafe")[i % 2])
    for i in range(n)
))
runner.run(suite, parse_system(system), out=out, progress=False, judges=())
indexed = peak()
own.append(reset())
judge_run(out, progress=False)
del suite  # as `t2i-eval run` does before its report, with the models the run kept loaded
release_models()
write_report(out)
print(generated[0], indexed, peak(), int(all(own)))
"""

PROMPT_GUARDS = ("blocklist", "profanity", "concept")


def make_run(root: Path, n: int) -> Path:
    """`write_run`'s guards-only run, its manifest completed as `t2i-eval run` writes it (the
    report names the suite's digest and size and the system's stages)."""
    write_run(root, n, 3, guards=True)
    store = RunStore(root)
    store.update_manifest(
        suite={"name": "synthetic", "version": "", "digest": f"synthetic-{n}", "n_prompts": n},
        system={
            "name": "guards",
            "prompt_guards": [{"name": g} for g in PROMPT_GUARDS],
            "generator": {"name": "guards-only"},
            "image_guards": [],
            "digest": "synthetic",
        },
    )
    return root


def child(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak resident MB, stdout) of a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, unlike RUSAGE_CHILDREN
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}")
    return wall, usage.ru_maxrss / 1024, out


def measure(run: Path, repeat: int) -> dict[str, float]:
    records = RunStore(run).generations_path(0)
    raw = min(float(child([sys.executable, "-c", RAW_PARSE, str(records)])[2]) for _ in range(3))
    report = [child([sys.executable, "-m", "t2i_eval", "report", str(run)]) for _ in range(repeat)]
    html = child([sys.executable, "-m", "t2i_eval", "report", str(run), "--html"])
    return {
        "mb": records.stat().st_size / 1e6,
        "raw": raw,
        "report": min(w for w, _, _ in report),
        "report_mb": max(m for _, m, _ in report),
        "html": html[0],
        "html_mb": html[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, action="append", help="run sizes (repeatable)")
    ap.add_argument("--repeat", type=int, default=3, help="report timings per size (best kept)")
    ap.add_argument("--run-records", type=int, default=100_000, help="0: skip the run phases")
    ap.add_argument("--run-system", default="blocklist", help="the run phases' system")
    args = ap.parse_args()
    sizes = args.records or [10_000, 100_000]
    with tempfile.TemporaryDirectory() as tmp:
        rows = {n: measure(make_run(Path(tmp) / f"run-{n}", n), args.repeat) for n in sizes}
        print("report at scale: synthetic guards-only runs (3 prompt guards a record)")
        print(
            f"{'records':>9} {'file MB':>8} {'raw parse s':>12} {'report s':>9} {'x raw':>6} "
            f"{'peak MB':>8} {'--html s':>9} {'x raw':>6} {'peak MB':>8}"
        )
        for n, r in rows.items():
            print(
                f"{n:>9,} {r['mb']:>8.1f} {r['raw']:>12.2f} {r['report']:>9.2f} "
                f"{r['report'] / r['raw']:>6.2f} {r['report_mb']:>8.0f} {r['html']:>9.2f} "
                f"{r['html'] / r['raw']:>6.2f} {r['html_mb']:>8.0f}"
            )
        print("targets: report <= 3x raw parse; peak < 400 MB at 100,000 records")
        if args.run_records:
            _, _, out = child(
                [sys.executable, "-c", RUN_PHASES, str(args.run_records), f"{tmp}/phases",
                 args.run_system]
            )
            generated, indexed, end, own = map(float, out.split())
            kind = "each phase's own peak" if own else "cumulative peaks (ru_maxrss)"
            print(
                f"\nrun of {args.run_records:,} prompts ({args.run_system}, guards-only), "
                f"{kind}: {generated:.1f} MB generating; {indexed:.1f} MB building the index, "
                f"{end:.1f} MB judging and reporting: end / generating "
                f"{max(indexed, end) / generated:.2f} (target <= 1.00)"
            )


if __name__ == "__main__":
    main()
