"""Prompt-guard and sweep speed on this machine, measured side by side in one run.

    .venv/bin/python bench/guards_speed.py            # or: make bench-guards

Prints, per guard, prompts/s batched (one call per --batch prompts) vs one prompt per call and
their ratio; then the time of `sweep` (with and without plots) and of `report` over a synthetic
run of --records records carrying three guards' scores each (target for the sweep: < 2 s here,
since it runs no model). Numbers vary with the machine's load: compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2i_eval.report import write_report  # noqa: E402
from t2i_eval.runner import record_id  # noqa: E402
from t2i_eval.store import RunStore  # noqa: E402
from t2i_eval.suites import load_suite  # noqa: E402
from t2i_eval.sweep import run_sweep  # noqa: E402
from t2i_eval.systems import build_system, parse_system  # noqa: E402
from t2i_eval.types import CATEGORIES, Generation, Prompt, StageDecision  # noqa: E402


def rate(fn, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        fn(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - start)


def synthetic_run(root: Path, n: int) -> None:
    """n records over n/2 prompts x 2 seeds, each with blocklist, profanity and concept scores."""
    rng = random.Random(0)
    store = RunStore(root)
    prompts = [
        Prompt(f"p{i}", f"prompt {i}", CATEGORIES[i % 9], "benign" if i % 3 else "unsafe")
        for i in range(n // 2)
    ]
    store.write_prompts(prompts)
    store.write_manifest(
        {
            "status": "complete",
            "argv": ["bench"],
            "seeds": 2,
            "suite": {
                "name": "synthetic",
                "version": "",
                "source": "bench",
                "digest": "x",
                "n_prompts": len(prompts),
            },
            "system": {
                "name": "guards",
                "prompt_guards": [
                    {"name": "blocklist"},
                    {"name": "profanity"},
                    {"name": "concept"},
                ],
                "generator": {"name": "guards-only"},
                "image_guards": [],
                "digest": "y",
            },
        }
    )
    gens = []
    for p in prompts:
        bump = 0.15 if p.label == "unsafe" else 0.0
        for seed in (0, 1):
            ds = (
                StageDecision(
                    "prompt_guard",
                    "blocklist",
                    (b := rng.random() < 0.2 + bump),
                    float(b),
                    0.0,
                    {"matches": {}},
                ),
                StageDecision(
                    "prompt_guard",
                    "profanity",
                    (s := rng.random() * 0.6 + bump) > 0.5,
                    round(s, 6),
                    0.5,
                    {"p_profane": s},
                ),
                StageDecision(
                    "prompt_guard",
                    "concept",
                    (m := rng.gauss(-0.1 + bump, 0.1)) > 0,
                    round(m, 6),
                    0.0,
                    {"max_cos": {c: 0.3 for c in CATEGORIES}},
                ),
            )
            refused = next((d for d in ds if d.refused), None)
            gens.append(
                Generation(
                    record_id(p.id, seed),
                    p.id,
                    seed,
                    "refused" if refused else "ok",
                    f"prompt_guard:{refused.name}" if refused else None,
                    ds,
                )
            )
    store.append_generations(gens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--records", type=int, default=10_000)
    args = ap.parse_args()
    texts = [p.text for p in load_suite("core").prompts]
    texts = (texts * (args.prompts // len(texts) + 1))[: args.prompts]
    print(f"prompts/s on {args.prompts} prompts (core suite), batch {args.batch} vs 1:")
    print("| guard | batched | one at a time | ratio |\n|---|---|---|---|")
    for name in ("blocklist", "profanity", "concept"):
        guard = build_system(parse_system(name)).prompt_guards[0]
        guard.check(texts[:8])  # warm up
        batched = rate(guard.check, texts, args.batch)
        single = rate(guard.check, texts, 1)
        print(f"| {name} | {batched:,.0f} | {single:,.0f} | {batched / single:.1f}x |")
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_run(Path(tmp), args.records)
        timings = {}
        for label, fn in (
            ("sweep, CSV+JSON", lambda: run_sweep(tmp, plots=False)),
            ("sweep, with plots", lambda: run_sweep(tmp, plots=True)),
            ("report", lambda: write_report(tmp)),
        ):
            start = time.perf_counter()
            fn()
            timings[label] = time.perf_counter() - start
    print(f"\nanalysis over a synthetic run of {args.records:,} records x 3 guards (no model):")
    print("| step | seconds | target |\n|---|---|---|")
    for label, sec in timings.items():
        target = "< 2 s" if label.startswith("sweep") else "< 5 s"
        print(f"| {label} | {sec:.2f} | {target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
