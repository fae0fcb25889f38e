"""Golden files: what a user sees of a fixed run, byte for byte, except its wall times.

A refactor must not change `report.md`, `summary.json` or `per_category.csv`. The run is
fixed (built-in suite, three prompts per category and label, two seeds, the fake generator
and two real word-level guards), so the files change only when the code does. When a change
is meant to alter them, regenerate with `T2I_EVAL_REGENERATE_GOLDEN=1 pytest tests/test_golden.py`
and say why in the commit message.

Wall times are the one part of a report that is not a function of the code: the same run takes
a different number of milliseconds every time. So before comparing, `normalised` replaces each
decimal number in report.md's "Where the time went" section, and each non-integer number under
summary.json's "timing", with `<t>`, and the golden copies are stored that way. Everything
else stays pinned: the section's presence, its wording and layout, its rows (which stages and
judges were timed, in which order) and its item counts. The times themselves are checked where
they can be exact: `tests/test_timing.py` drives the chain with a fake clock."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from t2i_eval.cli import main
from t2i_eval.paths import data_root

GOLDEN = Path(__file__).parent / "golden"
FILES = ("report.md", "summary.json", "per_category.csv")
#: The report.md section whose decimal numbers are wall times.
TIMED_SECTION = "\n## Where the time went\n"
TIME = "<t>"


def _times_out(value: Any) -> Any:
    """Every float under `value` replaced by TIME (counts are integers and stay)."""
    if isinstance(value, float):
        return TIME
    if isinstance(value, dict):
        return {k: _times_out(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_times_out(v) for v in value]
    return value


def normalised(name: str, data: bytes) -> bytes:
    """`data` of report file `name` with its wall times replaced by TIME (see the docstring)."""
    text = data.decode("utf-8")
    if name == "report.md":
        head, sep, tail = text.partition(TIMED_SECTION)
        body, nxt, rest = tail.partition("\n## ")
        text = head + sep + re.sub(r"\d+\.\d+", TIME, body) + nxt + rest
    elif name == "summary.json":
        obj = json.loads(text)
        if "timing" in obj:
            obj["timing"] = _times_out(obj["timing"])
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # as store writes it
    return text.encode("utf-8")


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "run"
    argv = ["run", "--system", str(GOLDEN / "system.yaml"), "--per-category", "3", "--seeds", "2"]
    assert main([*argv, "-q", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", FILES)
def test_report_files_match_the_golden_copy(golden_run: Path, name: str) -> None:
    raw = (golden_run / "report" / name).read_bytes().replace(str(golden_run).encode(), b"<RUN>")
    # the data folders' path (a guard's word list) depends on where the checkout is
    raw = raw.replace(str(data_root()).encode(), b"<DATA>")
    got = normalised(name, raw)
    want = GOLDEN / name
    if os.environ.get("T2I_EVAL_REGENERATE_GOLDEN"):
        want.write_bytes(got)
    assert got == want.read_bytes(), f"{name} changed; see this module's docstring"


def test_only_the_wall_times_are_normalised(golden_run: Path) -> None:
    """The run is timed (a report without its timing section would pass as unchanged only if
    the golden copy lacked it too), and normalising touches nothing but times."""
    report = (golden_run / "report" / "report.md").read_text()
    assert TIMED_SECTION in report
    head = report.partition(TIMED_SECTION)[0]
    assert normalised("report.md", head.encode()) == head.encode()
    summary = json.loads((golden_run / "report" / "summary.json").read_text())
    timing = _times_out(summary["timing"])
    assert {r["name"]: r["items"] for r in timing["stages"]} == {
        "blocklist": 108,
        "profanity": 108,
        "fake": 36,
    }
    assert all(r[k] == TIME for r in timing["stages"] for k in ("total_seconds", "ms_p50"))
    rest = {k: v for k, v in summary.items() if k != "timing"}
    assert _times_out(rest) != rest  # other floats (rates) exist and are left alone below
    assert json.loads(normalised("summary.json", json.dumps(rest).encode())) == rest
