"""Explorer responsiveness on two 10,000-record runs, measured in one process.

    .venv/bin/python bench/explorer_speed.py [--records 10000]

Writes two synthetic runs through the store API (no model: a third of the prompts refused by a
prompt guard, the rest sharing one image with a blank verdict), then times what the page does:
reading and pairing A with B once, and then each filter change and page turn (filter + one page
of rows rendered as HTML). Prints seconds per action and the ratio of a filter change to the
first load: a filter must not cost a reload.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from t2i_eval.explorer.app import Explorer  # noqa: E402
from t2i_eval.store import RunStore  # noqa: E402
from t2i_eval.types import (  # noqa: E402
    CATEGORIES,
    Generation,
    Prompt,
    StageDecision,
    Verdict,
    content_id,
)


def write_run(root: Path, n: int, refuse_every: int) -> None:
    store = RunStore(root)
    root.mkdir(parents=True)
    prompts = [
        Prompt(f"p{i}", f"prompt number {i}", CATEGORIES[i % 9], ("benign", "unsafe")[i % 2])
        for i in range(n)
    ]
    store.write_manifest(
        {
            "status": "complete",
            "suite": {"name": "synthetic"},
            "system": {"name": root.name},
            "components": [],
            "judges": {"blank@2": {"kind": "blank", "at": "2026-01-01T00:00:00"}},
        }
    )
    store.write_prompts(prompts)
    (root / "images").mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "images" / "one.png")
    gens, verdicts = [], []
    for i, p in enumerate(prompts):
        rid, refused = content_id(p.id, "0"), i % refuse_every == 0
        d = StageDecision("prompt_guard", "blocklist", refused, float(refused), 0.0, message="m")
        gens.append(
            Generation(
                rid,
                p.id,
                0,
                "refused" if refused else "ok",
                "prompt_guard:blocklist" if refused else None,
                (d,),
                None if refused else "images/one.png",
                None if refused else "image",
            )
        )
        if not refused:
            verdicts.append(Verdict(rid, "blank@2", False, 100.0, 10.0, reason="has content"))
    store.append_generations(gens)
    store.append_verdicts("blank@2", verdicts)


def timed(fn, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        write_run(runs / "A", args.records, 3)
        write_run(runs / "B", args.records, 5)
        ex = Explorer(runs)
        first = timed(lambda: ex.page("A", "B", "all", "all", "any", "A or B", "", 1))
        actions = {
            "filter: category": ("violence", "all", "any", "A or B", "", 1),
            "filter: outcome, A and B differ": ("all", "all", "any", "A and B differ", "", 1),
            "filter: text search": ("all", "all", "any", "A or B", "number 77", 1),
            "page turn (page 200)": ("all", "all", "any", "A or B", "", 200),
        }
        print(f"explorer on two runs of {args.records} records (synthetic, no model)")
        print(f"{'action':<36} {'seconds':>8} {'vs first load':>14}")
        print(f"{'first load (read + pair A, B)':<36} {first:>8.3f} {1.0:>14.2f}")
        for name, a in actions.items():
            s = timed(lambda a=a: ex.page("A", "B", *a), repeat=5)
            print(f"{name:<36} {s:>8.3f} {s / first:>14.3f}")


if __name__ == "__main__":
    main()
