"""Golden files: what a user sees of a fixed run, byte for byte.

A refactor must not change `report.md`, `summary.json` or `per_category.csv`. The run is
fixed (built-in suite, three prompts per category and label, two seeds, the fake generator
and two real word-level guards), so the files change only when the code does. When a change
is meant to alter them, regenerate with `T2I_EVAL_REGENERATE_GOLDEN=1 pytest tests/test_golden.py`
and say why in the commit message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from t2i_eval.cli import main

GOLDEN = Path(__file__).parent / "golden"
FILES = ("report.md", "summary.json", "per_category.csv")


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "run"
    argv = ["run", "--system", str(GOLDEN / "system.yaml"), "--per-category", "3", "--seeds", "2"]
    assert main([*argv, "-q", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", FILES)
def test_report_files_match_the_golden_copy(golden_run: Path, name: str) -> None:
    got = (golden_run / "report" / name).read_bytes().replace(str(golden_run).encode(), b"<RUN>")
    want = GOLDEN / name
    if os.environ.get("T2I_EVAL_REGENERATE_GOLDEN"):
        want.write_bytes(got)
    assert got == want.read_bytes(), f"{name} changed; see this module's docstring"
