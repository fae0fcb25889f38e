"""Embedding cache speed: the same prompts through the concept guard cold and warm, side by side.

    .venv/bin/python bench/embed_cache_speed.py            # or: make bench

Target (the scale issue's embedding cache): a second guards-only run over the same prompts
spends at least 10x less time in the guard stage than the first.

Two measurements, each starting from an empty cache in a temporary T2I_EVAL_CACHE:
1. runs: `t2i-eval run --system concept` twice into two run folders, each in its own process
   (as a user would run it), per suite; guard-stage seconds = the sum of the records' `seconds`
   (guards-only: the concept guard is the only stage that works). Only when text_guards routes
   the sentence model through the cache (`load_sentence_model` returns a `CachedEncoder`);
   otherwise the section says so and is skipped.
2. direct: the concept guard's `check()` over the same prompts in the runner's batches, with the
   bare model, then wrapped (`cached_encoder`) on an empty cache, then wrapped again by a fresh
   wrapper and connection (warm, served from disk). Works with or without the wiring.
Both check that warm scores equal cold scores exactly. Suites: the built-in core suite, plus
OVERT-mini from ../shared/data/overt/ when present. Numbers vary with the machine's load: compare
the ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2i_eval.embed_cache import CachedEncoder, EmbeddingCache, cached_encoder  # noqa: E402
from t2i_eval.store import RunStore  # noqa: E402
from t2i_eval.suites import load_suite  # noqa: E402

OVERT_MINI = ROOT.parent / "shared" / "data" / "overt" / "OVERT_mini.csv"
TARGET = 10.0


def suites() -> list[str]:
    return ["core", *([str(OVERT_MINI)] if OVERT_MINI.is_file() else [])]


def guard_run(suite: str, out: Path, cache: Path, batch: int) -> tuple[float, dict[str, tuple]]:
    """One `t2i-eval run --system concept` in its own process: (guard-stage seconds, decisions)."""
    env = {**os.environ, "T2I_EVAL_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "t2i_eval", "run", "--suite", suite, "--system", "concept"]
    cmd += ["--out", str(out), "--batch-size", str(batch), "-q"]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    records = RunStore(out).read_generations()
    seconds = sum(g.seconds or 0.0 for g in records.values())
    decisions = {
        rid: tuple((d.refused, d.score) for d in g.decisions) for rid, g in records.items()
    }
    return seconds, decisions


def timed_check(guard, texts: list[str], batch: int) -> tuple[float, list]:
    start = time.perf_counter()
    out = []
    for i in range(0, len(texts), batch):
        out.extend((d.refused, d.score) for d in guard.check(texts[i : i + batch]))
    return time.perf_counter() - start, out


def direct(
    guard, model, texts: list[str], folder: Path, batch: int
) -> tuple[float, float, float, bool]:
    """(bare, cold, warm) seconds of check() over texts, and whether warm == cold exactly."""
    guard.encoder = model
    bare, _ = timed_check(guard, texts, batch)
    guard.encoder = cached_encoder(model, "minilm", cache=EmbeddingCache(folder=folder))
    cold, cold_scores = timed_check(guard, texts, batch)
    guard.encoder.cache.close()
    # a fresh wrapper and connection, as a second process would have: served from disk
    guard.encoder = cached_encoder(model, "minilm", cache=EmbeddingCache(folder=folder))
    warm, warm_scores = timed_check(guard, texts, batch)
    guard.encoder.cache.close()
    return bare, cold, warm, warm_scores == cold_scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="prompts per check (runner default: 8)")
    ap.add_argument("--no-runs", action="store_true", help="only the direct measurement")
    args = ap.parse_args()

    from t2i_eval.systems.text_guards import ConceptGuard

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["T2I_EVAL_CACHE"] = str(Path(tmp) / "cache")  # an empty cache, left alone
        guard = ConceptGuard()
        wired = isinstance(guard.encoder, CachedEncoder)
        model = guard.encoder.model if wired else guard.encoder
        worst = float("inf")

        print(f"direct: ConceptGuard.check() in batches of {args.batch} (seconds)")
        print(
            f"{'suite':<16}{'prompts':>8}{'bare':>9}{'cold':>9}{'warm':>9}{'cold/warm':>11}  same"
        )
        for s in suites():
            texts = [p.text for p in load_suite(s).prompts]
            folder = Path(tmp) / "direct" / Path(s).stem
            bare, cold, warm, same = direct(guard, model, texts, folder, args.batch)
            worst = min(worst, cold / warm)
            print(
                f"{Path(s).stem:<16}{len(texts):>8}{bare:>9.2f}{cold:>9.2f}{warm:>9.3f}"
                f"{cold / warm:>10.1f}x  {'yes' if same else 'NO'}"
            )

        print()
        if args.no_runs:
            print("runs: skipped (--no-runs)")
        elif not wired:
            print(
                "runs: skipped: text_guards.load_sentence_model does not return a CachedEncoder "
                "yet, so `t2i-eval run` does not use the cache"
            )
        else:
            print("runs: `t2i-eval run --system concept` twice, each in its own process")
            print(f"{'suite':<16}{'records':>8}{'1st (s)':>9}{'2nd (s)':>9}{'1st/2nd':>11}  same")
            for s in suites():
                cache = Path(tmp) / "runs" / Path(s).stem
                first, d1 = guard_run(s, Path(tmp) / f"{Path(s).stem}-1", cache, args.batch)
                second, d2 = guard_run(s, Path(tmp) / f"{Path(s).stem}-2", cache, args.batch)
                worst = min(worst, first / second)
                print(
                    f"{Path(s).stem:<16}{len(d1):>8}{first:>9.2f}{second:>9.3f}"
                    f"{first / second:>10.1f}x  {'yes' if d1 == d2 else 'NO'}"
                )
        verdict = "met" if worst >= TARGET else "NOT met"
        print(
            f"\ntarget: cold/warm guard-stage time >= {TARGET:g}x: {verdict} (worst {worst:.1f}x)"
        )
    return 0 if worst >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
