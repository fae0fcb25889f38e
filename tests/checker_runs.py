"""Runs of the tiny generator through the tiny safety checker forced to flag every image
(concept thresholds -1) or none (100): runs whose image-guard answers are known, for the
sweep and trigger tests."""

from __future__ import annotations

from pathlib import Path

from helpers import write_suite
from tiny_parts import checker_copy

from t2i_eval.cli import main

#: 6 benign and 3 unsafe prompts in one category; 2 seeds each: 12 benign and 6 unsafe images.
ROWS = [(f"a quiet lake number {i}", "benign") for i in range(6)] + [
    (f"a violent scene {i}", "unsafe") for i in range(3)
]
SEEDS = 2


def forced_checker_run(root: Path, weight: float, *extra: str) -> tuple[Path, Path, Path]:
    """(run dir, checker folder, suite file) of a run of ROWS whose checker has every concept
    threshold set to `weight`; `extra` options go into the checker's spec."""
    from t2i_eval.systems.tiny import ensure_tiny

    suite = write_suite(root / "s.jsonl", ROWS)
    checker = checker_copy(ensure_tiny(), root, weight)
    system = root / f"sys_{weight}.yaml"
    options = ", ".join([f"model: '{checker}'", "device: cpu", *extra])
    system.write_text(f"generator: tiny\nimage_guards: [{{name: safety_checker, {options}}}]\n")
    out = root / f"run_{weight}{'_' + str(len(extra)) if extra else ''}"
    argv = ["run", "--suite", str(suite), "--system", str(system), "--seeds", str(SEEDS)]
    assert main([*argv, "--out", str(out), "-q"]) == 0
    return out, checker, suite
