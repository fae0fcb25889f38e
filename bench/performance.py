"""Performance ratios measured side by side in one run; writes docs/performance.md.

    .venv/bin/python bench/performance.py            # or: make bench   (under 10 minutes here)

1. overhead: a bare diffusers loop (OVERT-style: generate, save PNG) vs `t2i-eval run` on the
   same pipeline, prompts, seeds and batch size (target: t2i-eval >= 0.95 of the bare images/s);
2. batching: one prompt per call (as OVERT's runner) vs the batched runner;
3. guards and judges: items/s batched vs one at a time;
4. analysis: `sweep` and `report` over a synthetic run of 10,000 records (targets < 2 s, < 5 s);
5. memory: peak RSS of a long run (fake system) at N and 4N records (flat = nothing accumulates).
The GPU section comes from docs/gpu_table.json (bench/gpu_table.py, run on a GPU machine);
`--gpu-section-only` re-renders just that section without rerunning the CPU bench.
Tiny random-weight models on this CPU: the ratios are what carry over, not the absolute rates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from bench_doc import write_doc  # noqa: E402

torch.set_num_threads(1)

from gpu_table import load_json as load_gpu_json  # noqa: E402
from gpu_table import render_section as gpu_section  # noqa: E402
from gpu_table import write_gpu_section  # noqa: E402
from guards_speed import rate as guard_rate  # noqa: E402
from guards_speed import synthetic_run  # noqa: E402
from judges_speed import rate as judge_rate  # noqa: E402

from t2i_eval.judges import JudgeItem, judge_from_spec, load_spec  # noqa: E402
from t2i_eval.report import write_report  # noqa: E402
from t2i_eval.runner import run  # noqa: E402
from t2i_eval.suites import load_suite  # noqa: E402
from t2i_eval.sweep import run_sweep  # noqa: E402
from t2i_eval.systems import build_system, parse_system  # noqa: E402
from t2i_eval.systems.diffusers import load_pipeline  # noqa: E402
from t2i_eval.systems.tiny import ensure_tiny  # noqa: E402

MEMORY_CHILD = """
import sys, tempfile, tracemalloc
from t2i_eval.runner import run
from t2i_eval.store import RunStore
from t2i_eval.systems import parse_system
from t2i_eval.types import Prompt, Suite
n = int(sys.argv[1])
suite = Suite("mem", tuple(Prompt(f"p{i}", f"prompt number {i}", "violence", "benign")
                          for i in range(n)))
samples = []
append = RunStore.append_generations
def traced(self, gens, rank=0):
    append(self, gens, rank)
    samples.append(tracemalloc.get_traced_memory()[0])
RunStore.append_generations = traced
tracemalloc.start()
with tempfile.TemporaryDirectory() as tmp:
    run(suite, parse_system("blocklist>fake"), out=tmp + "/r", batch_size=16, progress=False,
        judges=())
# Python heap while the loop runs: at 10% of the batches and at the last one
print(samples[len(samples) // 10], samples[-1])
"""


def bare_loop(prompts: list[str], batch: int, out: Path, steps: int) -> float:
    start = time.perf_counter()  # like `t2i-eval run`, the timed work includes loading the model
    pipe = load_pipeline(str(ensure_tiny()), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(0) for _ in chunk]
        images = pipe(
            prompt=chunk,
            generator=gens,
            num_inference_steps=steps,
            height=64,
            width=64,
            output_type="pil",
        ).images
        for j, im in enumerate(images):
            im.save(out / f"{i + j}.png")
    return len(prompts) / (time.perf_counter() - start)


def ours(prompts_n: int, batch: int, out: Path, system: str) -> float:
    start = time.perf_counter()
    run(
        load_suite("core"),
        parse_system(system),
        out=out,
        limit=prompts_n,
        batch_size=batch,
        progress=False,
        judges=(),
    )
    return prompts_n / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"))
    ap.add_argument(
        "--gpu-section-only",
        action="store_true",
        help="only re-render the GPU section of --doc from docs/gpu_table.json (no CPU bench)",
    )
    args = ap.parse_args()
    if args.gpu_section_only:
        write_gpu_section(Path(args.doc), load_gpu_json())
        print(f"written: GPU section of {args.doc}")
        return 0
    rows: list[tuple[str, str, str, str]] = []
    texts = [p.text for p in load_suite("core").prompts][: args.images]
    gen_only = ROOT / "outputs" / ".bench-tiny-gen.yaml"
    gen_only.parent.mkdir(parents=True, exist_ok=True)
    gen_only.write_text("name: tiny-generator-only\ngenerator: tiny\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours(4, args.batch, tmp / "warm", str(gen_only))  # loads models, warms caches
        bare = bare_loop(texts, args.batch, tmp / "bare", steps=2)
        mine = ours(args.images, args.batch, tmp / "ours", str(gen_only))
        rows.append(
            (
                "overhead: t2i-eval run vs bare diffusers loop (tiny SD, batch "
                f"{args.batch}, {args.images} images)",
                f"{mine:.1f} img/s",
                f"{bare:.1f} img/s",
                f"{mine / bare:.2f} (target >= 0.95)",
            )
        )
        one = ours(args.images // 2, 1, tmp / "one", str(gen_only))
        batched = ours(args.images // 2, args.batch, tmp / "batched", str(gen_only))
        rows.append(
            (
                f"batching: batch {args.batch} vs one prompt per call",
                f"{batched:.1f} img/s",
                f"{one:.1f} img/s",
                f"{batched / one:.2f}x",
            )
        )
    for name in ("blocklist", "profanity", "concept"):
        g = build_system(parse_system(name)).prompt_guards[0]
        g.check(texts[:4])
        b, s = guard_rate(g.check, texts, 64), guard_rate(g.check, texts, 1)
        rows.append(
            (
                f"guard {name}: batch 64 vs 1",
                f"{b:,.0f} prompts/s",
                f"{s:,.0f} prompts/s",
                f"{b / s:.1f}x",
            )
        )
    from t2i_eval.systems.tiny import TinyGenerator

    images = [r.image for r in TinyGenerator().generate(texts[:64], list(range(64)))]
    items = [
        JudgeItem(str(i), im, texts[i], "violence", "benign", reference=images[-1 - i])
        for i, im in enumerate(images)
    ]
    for name in ("blank", "faithfulness", "sanitization", "harm"):
        j = judge_from_spec(load_spec(name, clip=None if name == "blank" else "tiny"))
        j.judge_batch(items[:2])
        b, s = judge_rate(j, items, 32), judge_rate(j, items, 1)
        rows.append(
            (
                f"judge {name} (tiny CLIP): batch 32 vs 1",
                f"{b:,.1f} img/s",
                f"{s:,.1f} img/s",
                f"{b / s:.1f}x",
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_run(Path(tmp), 10_000)
        for label, fn, target in (
            ("sweep (CSV+JSON), 10,000 records", lambda: run_sweep(tmp, plots=False), 2),
            ("sweep with PNG plots, 10,000 records", lambda: run_sweep(tmp, plots=True), 2),
            ("report, 10,000 records", lambda: write_report(tmp), 5),
        ):
            start = time.perf_counter()
            fn()
            sec = time.perf_counter() - start
            rows.append(
                (
                    label,
                    f"{sec:.2f} s",
                    f"target < {target} s",
                    "meets" if sec < target else "misses",
                )
            )
    for n in (2000, 16000):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(n)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        early, late = (int(x) / 2**20 for x in out.stdout.split())
        rows.append(
            (
                f"memory during a run, blocklist>fake, {n:,} records: heap at 10% vs at the "
                "last batch",
                f"{late:.2f} MiB",
                f"{early:.2f} MiB",
                f"+{(late - early) * 2**20 / (0.9 * n):.0f} B/record (flat = ~0)",
            )
        )
    table = ["| measure | t2i-eval / this | baseline / other | ratio |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    doc = [
        "# Performance",
        "",
        f"Generated by `.venv/bin/python bench/performance.py` on {dt.date.today()}; edit nothing "
        f"by hand. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, one torch thread. Models are tiny and random-weight (the "
        "embedded default): ratios carry over to real models only as far as overhead does, which "
        "is why the GPU table below matters.",
        "",
        "## CPU (this machine)",
        "",
        *table,
        "",
        *gpu_section(load_gpu_json()),  # measured on a GPU by bench/gpu_table.py, if ever
    ]
    write_doc(args.doc, "\n".join(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
