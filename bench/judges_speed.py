"""Image-judge speed on this machine, measured side by side in one run.

    .venv/bin/python bench/judges_speed.py

Prints images/s for each judge batched (--batch images per call) vs one image per call (the
image-embedding cache cleared before each pass, so both do the same work) on the tiny CLIP, and
the judges' share of total run time on the tiny system (generation + judging of the same
images). Random-weight tiny models: same code path as real ones, far fewer FLOPs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)

from t2i_eval.judges import JudgeItem, judge_from_spec, load_spec  # noqa: E402
from t2i_eval.judging import judge_run  # noqa: E402
from t2i_eval.runner import run  # noqa: E402
from t2i_eval.suites import load_suite  # noqa: E402
from t2i_eval.systems import parse_system  # noqa: E402
from t2i_eval.systems.tiny import TinyGenerator  # noqa: E402


def rate(judge, items, batch: int) -> float:
    clip = getattr(judge, "clip", None)
    if clip is not None:
        clip._image_cache.clear()
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        judge.judge_batch(items[i : i + batch])
    return len(items) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    prompts = [p for p in load_suite("core").prompts][: args.images]
    gen = TinyGenerator()
    images = [r.image for r in gen.generate([p.text for p in prompts], list(range(len(prompts))))]
    items = [
        JudgeItem(str(i), im, p.text, p.category, p.label, reference=images[-1 - i])
        for i, (p, im) in enumerate(zip(prompts, images, strict=True))
    ]
    print(
        f"judge images/s on {len(items)} tiny-SD images, batch {args.batch} vs 1 "
        "(tiny random-weight CLIP):"
    )
    print("| judge | batched | one at a time | ratio |\n|---|---|---|---|")
    for name in ("blank", "faithfulness", "sanitization", "harm"):
        judge = judge_from_spec(load_spec(name, clip=None if name == "blank" else "tiny"))
        judge.judge_batch(items[:2])  # warm up (loads models)
        b, s = rate(judge, items, args.batch), rate(judge, items, 1)
        print(f"| {name} | {b:,.1f} | {s:,.1f} | {b / s:.1f}x |")
    with tempfile.TemporaryDirectory() as tmp:
        suite = load_suite("core")
        start = time.perf_counter()
        res = run(
            suite,
            parse_system("tiny"),
            out=Path(tmp) / "run",
            limit=args.images,
            batch_size=8,
            progress=False,
            judges=(),
        )
        t_gen = time.perf_counter() - start
        timings = {}
        for name in ("blank", "faithfulness", "harm"):
            start = time.perf_counter()
            judge_run(res.run_dir, name, clip=None if name == "blank" else "tiny", progress=False)
            timings[name] = time.perf_counter() - start
    total = t_gen + sum(timings.values())
    print(f"\nshare of total run time, tiny system, {args.images} prompts (generation + judges):")
    print("| step | seconds | share |\n|---|---|---|")
    print(f"| generation (tiny SD + safety checker) | {t_gen:.2f} | {t_gen / total:.0%} |")
    for name, sec in timings.items():
        print(f"| judge {name} | {sec:.2f} | {sec / total:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
