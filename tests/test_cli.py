"""The CLI's exit codes: 0 done, 1 outages (rerun), 2 bad input (fix it), 70 a bug in t2i-eval."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2i_eval import cli
from t2i_eval.errors import INTERNAL_ERROR


def test_an_unforeseen_error_is_one_line_exit_70_with_the_traceback_in_a_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("an internal invariant broke\nsecond line of the message")

    monkeypatch.setattr(cli, "cmd_report", broken)
    code = cli.main(["report", "anything"])
    err = capsys.readouterr().err
    assert code == INTERNAL_ERROR == 70
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback (most recent call last)" not in err
    assert lines[0].startswith("t2i-eval: internal error: RuntimeError: an internal invariant")
    assert "this is a bug in t2i-eval, not your input" in lines[0]
    saved = lines[0].rsplit("Traceback saved to ", 1)[1]
    text = Path(saved).read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in text and "in broken" in text


def test_a_user_error_line_is_cut_to_a_readable_length(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def hostile(args: object) -> int:
        raise cli.UserError("bad value " + "x" * 1_000_000)

    monkeypatch.setattr(cli, "cmd_report", hostile)
    assert cli.main(["report", "anything"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("t2i-eval: error: bad value xxx") and len(line) < 700


def test_a_crash_report_never_holds_a_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "sk-crash/Report+Key=9f8e7d6c5b4a"
    monkeypatch.setenv("OPENAI_API_KEY", key)

    def leaky(args: object) -> int:
        raise RuntimeError(f"request with Authorization: Bearer {key} failed")

    monkeypatch.setattr(cli, "cmd_report", leaky)
    assert cli.main(["report", "anything"]) == INTERNAL_ERROR
    line = capsys.readouterr().err
    text = Path(line.rsplit("Traceback saved to ", 1)[1].strip()).read_text(encoding="utf-8")
    for i in range(len(key) - 7):
        assert key[i : i + 8] not in line and key[i : i + 8] not in text
