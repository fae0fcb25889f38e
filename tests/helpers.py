"""Scaffolding several test files share: a suite file, a word-list guards-only run and a
hand-made generation record."""

from __future__ import annotations

import json
from pathlib import Path

from t2i_eval.cli import main
from t2i_eval.types import Generation, Status


def write_suite(path: Path, rows: list[tuple], category: str = "violence") -> Path:
    """(text, label) or (text, label, pair_id) rows -> a JSONL suite file."""
    lines = []
    for text, label, *pair in rows:
        row = {"prompt": text, "category": category, "label": label}
        if pair:
            row["pair_id"] = pair[0]
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines))
    return path


def guarded_run(tmp_path: Path, rows: list[tuple], words: list[str], *args: str) -> Path:
    """Run `rows` through a guards-only system whose one stage is a blocklist of `words`
    (kept in tmp_path/words.yaml, so a test can edit it later); returns the run directory."""
    word_list = tmp_path / "words.yaml"
    word_list.write_text(f"version: 1\ncategories:\n  violence: [{', '.join(words)}]\n")
    system = tmp_path / "sys.yaml"
    system.write_text(
        f"prompt_guards: [{{name: blocklist, path: '{word_list}'}}]\ngenerator: guards-only\n"
    )
    suite = write_suite(tmp_path / "s.jsonl", rows)
    out = tmp_path / "run"
    argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(out), "-q", *args]
    assert main(argv) == 0
    return out


def make_generation(
    rid: str, pid: str, status: Status, refused_by: str | None = None
) -> Generation:
    """A seed-0 record with an image exactly when `status` is ok (as the runner writes one)."""
    return Generation(
        record_id=rid,
        prompt_id=pid,
        seed=0,
        status=status,
        refused_by=refused_by,
        image_path=f"images/{rid}.png" if status == "ok" else None,
    )
