"""Explorer responsiveness and server memory at 10,000 and 100,000 records.

    .venv/bin/python bench/explorer_speed.py [--records 10000 --records 100000]

For each size it writes two synthetic guards-only runs A and B through the store API (each
record carries the three prompt guards' decisions as `--system guards` writes them, about 2 KB a
line; A refuses every 3rd prompt, B every 5th), then starts a fresh process per measurement that
launches the explorer's server (Gradio, on 127.0.0.1) and times what the page asks for:

- cold: no run index exists yet: the first page of rows of A (which builds A's index, once),
  then B's index build on its own;
- warm: a new server over the same runs (indexes on disk): the first page of rows of A, the
  summary table and chart, the first page of A vs B (which pairs them), each filter change, a
  text search and a page turn (median of 5);
- the server process's resident memory: after Gradio started (the floor), and its peak.

Prints one table per size, numbers side by side. `write_run(root, n, refuse_every)` is also
used by the report bench.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2i_eval.store import RunStore  # noqa: E402
from t2i_eval.types import (  # noqa: E402
    CATEGORIES,
    Generation,
    Prompt,
    StageDecision,
    Verdict,
    content_id,
)

CHUNK = 5_000
"""Records written per append: the writer never holds a whole large run."""


def _guard_decisions(i: int, refused: bool) -> tuple[StageDecision, ...]:
    """The decisions a `--system guards` record carries (blocklist, profanity, concept, the
    guards-only generator), with raw scores of the same shape and size."""
    cos = {c: round((i * 7 + k * 13) % 100 / 100, 6) for k, c in enumerate(CATEGORIES)}
    concept_raw = {
        "max_cos": cos,
        "nearest": {c: f"an unsafe concept phrase for {c}" for c in CATEGORIES},
        "thresholds": dict.fromkeys(CATEGORIES, 0.5),
    }
    return (
        StageDecision(
            "prompt_guard",
            "blocklist",
            refused,
            float(refused),
            0.0,
            {"matches": {"violence": ["kill"]} if refused else {}},
            "matched 'kill'" if refused else "",
            0.0004,
        ),
        StageDecision(
            "prompt_guard", "profanity", False, 0.05, 0.5, {"p_profane": 0.05}, "", 0.004
        ),
        StageDecision(
            "prompt_guard", "concept", False, max(cos.values()) - 0.5, 0.0, concept_raw, "", 0.018
        ),
        StageDecision(
            "generator", "guards-only", False, None, None, {}, "not generated (guards-only)"
        ),
    )


def _records(
    prompts: list[Prompt], refuse_every: int, guards: bool
) -> Iterator[tuple[Generation, Verdict | None]]:
    for i, p in enumerate(prompts):
        rid, refused = content_id(p.id, "0"), i % refuse_every == 0
        if guards:
            gen = Generation(
                rid,
                p.id,
                0,
                "refused" if refused else "ok",
                "prompt_guard:blocklist" if refused else None,
                _guard_decisions(i, refused),
                seconds=0.022,
            )
            yield gen, None
            continue
        d = StageDecision("prompt_guard", "blocklist", refused, float(refused), 0.0, message="m")
        gen = Generation(
            rid,
            p.id,
            0,
            "refused" if refused else "ok",
            "prompt_guard:blocklist" if refused else None,
            (d,),
            None if refused else "images/one.png",
            None if refused else "image",
        )
        verdict = (
            None if refused else Verdict(rid, "blank@2", False, 100.0, 10.0, reason="has content")
        )
        yield gen, verdict


def write_run(root: Path, n: int, refuse_every: int, *, guards: bool = False) -> None:
    """A synthetic run of `n` prompts over the nine categories, every `refuse_every`-th refused
    by the blocklist. Default: one decision per record, the rest sharing one image with a blank
    verdict; `guards`: guards-only records as `--system guards` writes them (no images)."""
    from PIL import Image

    store = RunStore(root)
    root.mkdir(parents=True)
    prompts = [
        Prompt(f"p{i}", f"prompt number {i}", CATEGORIES[i % 9], ("benign", "unsafe")[i % 2])
        for i in range(n)
    ]
    judges = {} if guards else {"blank@2": {"kind": "blank", "at": "2026-01-01T00:00:00"}}
    store.write_manifest(
        {
            "status": "complete",
            "suite": {"name": "synthetic"},
            "system": {"name": root.name},
            "components": [],
            "judges": judges,
        }
    )
    store.write_prompts(prompts)
    if not guards:
        (root / "images").mkdir()
        Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "images" / "one.png")
    records = _records(prompts, refuse_every, guards)
    while chunk := [r for _, r in zip(range(CHUNK), records, strict=False)]:
        store.append_generations(g for g, _ in chunk)
        verdicts = [v for _, v in chunk if v is not None]
        if verdicts:
            store.append_verdicts("blank@2", verdicts)


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _rss_mb() -> tuple[float, float]:
    """(resident now, peak resident) of this process in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def child(runs: Path, phase: str) -> dict[str, float]:
    """One server process: launch the explorer, then time what the page asks for."""
    from t2i_eval.explorer.app import launch

    demo, _ = launch(runs, block=False)
    ex = demo.t2i_explorer
    out: dict[str, float] = {f"server RSS, Gradio alone ({phase})": _rss_mb()[0]}

    def rows(b: str | None) -> None:  # what the page load asks for first
        ex.page("A", b, "all", "all", "any", "A or B", "", 1)

    if phase == "cold":  # no index yet: the first page builds A's
        out["first rows, A, cold (builds index)"] = timed(lambda: rows(None))
        try:
            from t2i_eval.run_index import open_index
        except ImportError:  # the explorer before the run index: nothing to build
            out["index build, B (one-time)"] = float("nan")
        else:
            out["index build, B (one-time)"] = timed(lambda: open_index(runs / "B"))
    else:
        out["first rows, A (warm index)"] = timed(lambda: rows(None))
        out["summary + chart, A"] = timed(lambda: ex.summary("A", None))
        out["first rows, A vs B (pairs them)"] = timed(lambda: rows("B"))
        out["summary + chart, A and B"] = timed(lambda: ex.summary("A", "B"))
        actions = {
            "filter: category": ("violence", "all", "any", "A or B", "", 1),
            "filter: outcome refused, in A": ("all", "all", "refused (any stage)", "A", "", 1),
            "filter: A and B differ": ("all", "all", "any", "A and B differ", "", 1),
            "text search": ("all", "all", "any", "A or B", "number 77", 1),
            "text search, no hit": ("all", "all", "any", "A or B", "zebra", 1),
            "page turn (page 200)": ("all", "all", "any", "A or B", "", 200),
        }
        for name, a in actions.items():
            out[name] = timed(lambda a=a: ex.page("A", "B", *a), repeat=5)
    out[f"server RSS peak ({phase})"] = _rss_mb()[1]
    demo.close()
    return out


def measure(runs: Path, phase: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(runs), "--phase", phase]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, action="append", help="records per run (repeatable)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="warm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.phase)))
        return
    sizes = args.records or [10_000, 100_000]
    results: dict[int, dict[str, float]] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            runs = Path(tmp)
            t = time.perf_counter()
            write_run(runs / "A", n, 3, guards=True)
            write_run(runs / "B", n, 5, guards=True)
            print(
                f"wrote two guards-only runs of {n} records in {time.perf_counter() - t:.1f} s",
                file=sys.stderr,
            )
            results[n] = {**measure(runs, "cold"), **measure(runs, "warm")}
    names = list(dict.fromkeys(k for r in results.values() for k in r))
    print("explorer on two guards-only runs (synthetic, no model); seconds, memory in MB")
    print(f"{'':<34}" + "".join(f"{f'{n:,} records':>16}" for n in sizes))
    for name in names:
        unit = "MB" if "RSS" in name else "s"
        cells = "".join(f"{results[n].get(name, float('nan')):>14.2f} {unit}" for n in sizes)
        print(f"{name:<34}{cells}")


if __name__ == "__main__":
    main()
