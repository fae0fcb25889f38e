import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from t2i_eval.errors import UserError
from t2i_eval.store import STORE_VERSION, RunStore
from t2i_eval.types import Generation, Verdict


def _gen(rid, status="ok"):
    return Generation(rid, "p", 0, status, image_path=None)


def test_append_and_read_latest_wins_over_error(tmp_path):
    s = RunStore(tmp_path)
    s.append_generations([_gen("a", "error"), _gen("b")])
    s.append_generations([_gen("a", "ok")])
    gens = s.read_generations()
    assert gens["a"].status == "ok" and set(gens) == {"a", "b"}


def test_error_never_overrides_a_finished_record(tmp_path):
    s = RunStore(tmp_path)
    s.append_generations([_gen("a", "refused")])
    s.append_generations([_gen("a", "error")])
    assert s.read_generations()["a"].status == "refused"


def test_torn_last_line_dropped_with_warning_and_repaired_on_append(tmp_path, caplog):
    s = RunStore(tmp_path)
    s.append_generations([_gen("a"), _gen("b")])
    path = s.generations_path()
    with open(path, "ab") as f:
        f.write(b'{"record_id": "c", "prompt_id": "p", "se')  # crash mid-write
    gens = s.read_generations()
    assert set(gens) == {"a", "b"}
    assert "torn last line" in caplog.text
    s.append_generations([_gen("c")])
    lines = path.read_text().splitlines()
    assert [json.loads(x)["record_id"] for x in lines] == ["a", "b", "c"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    s = RunStore(tmp_path)
    s.generations_path().parent.mkdir(parents=True)
    good = json.dumps(_gen("a").to_dict())
    s.generations_path().write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(UserError, match="line 2: corrupt record"):
        s.read_generations()


def test_manifest_version_checked(tmp_path):
    s = RunStore(tmp_path)
    s.write_manifest({"status": "running", "suite": {}, "system": {}})
    assert s.read_manifest()["store_version"] == STORE_VERSION
    data = json.loads(s.manifest_path.read_text())
    data["store_version"] = 999
    s.manifest_path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="format version 999"):
        s.read_manifest()


def test_not_a_run_dir(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        RunStore(tmp_path).read_manifest()


def test_resolve_confines_paths(tmp_path):
    s = RunStore(tmp_path / "run")
    (tmp_path / "run").mkdir()
    assert s.resolve("images/x.png") == (tmp_path / "run" / "images" / "x.png").resolve()
    with pytest.raises(UserError, match="outside the run directory"):
        s.resolve("../secret.txt")
    with pytest.raises(UserError, match="outside the run directory"):
        s.resolve("/etc/passwd")


def test_images_atomic_and_readable(tmp_path):
    s = RunStore(tmp_path)
    rel = s.save_image("r1", Image.new("RGB", (8, 8), (1, 2, 3)))
    assert rel == "images/r1.png"
    with Image.open(tmp_path / rel) as img:
        assert img.getpixel((0, 0)) == (1, 2, 3)
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]


def test_verdicts_by_judge_key(tmp_path):
    s = RunStore(tmp_path)
    s.append_verdicts("blank@1", [Verdict("a", "blank@1", True, reason="black")])
    s.append_verdicts("blank@2", [Verdict("a", "blank@2", False)])
    assert s.verdict_keys() == ["blank@1", "blank@2"]
    assert s.read_verdicts("blank@1")["a"].flagged is True
    assert s.read_verdicts("nope@1") == {}


def test_record_of_another_format_is_a_clear_error(tmp_path):
    s = RunStore(tmp_path)
    s.generations_path().parent.mkdir(parents=True)
    s.generations_path().write_text('{"record_id": "a", "colour": "red"}\n')
    with pytest.raises(UserError, match="not a record of this t2i-eval version"):
        s.read_generations()


def test_manifest_missing_keys_is_a_clear_error(tmp_path):
    s = RunStore(tmp_path)
    s.write_manifest({"status": "running"})
    with pytest.raises(UserError, match="missing suite, system; not a manifest written by"):
        s.read_manifest()


def test_statuses_stream_latest_status(tmp_path):
    s = RunStore(tmp_path)
    s.append_generations([_gen("a", "error"), _gen("b", "refused")], rank=0)
    s.append_generations([_gen("a", "ok"), _gen("b", "error")], rank=1)
    assert s.statuses() == {"a": "ok", "b": "refused"}
    assert s.statuses() == {k: g.status for k, g in s.read_generations().items()}


def test_statuses_read_only_two_fields_and_refuse_a_line_without_them(tmp_path):
    """`statuses` decodes only record_id and status; a blank line and a torn last line are
    read as every reader reads them, and a line without a usable status names its line."""
    s = RunStore(tmp_path)
    s.append_generations([_gen("a", "ok"), _gen("b", "refused")])
    path = s.generations_path()
    path.write_bytes(path.read_bytes() + b"\n" + b'{"record_id": "c", "sta')
    assert s.statuses() == {"a": "ok", "b": "refused"}
    # the other fields are not read: a value no full reader takes is no concern of statuses
    kept = path.read_bytes().rsplit(b"\n", 1)[0]
    path.write_bytes(kept + b'\n{"record_id": "d", "status": "ok", "decisions": 5}\n')
    assert s.statuses() == {"a": "ok", "b": "refused", "d": "ok"}
    with pytest.raises(UserError, match="line 4: not a record"):
        s.read_records()
    path.write_bytes(kept + b'\n{"record_id": "c", "status": "fine"}\n')
    with pytest.raises(UserError, match=r"line 4: .*a status of ok, refused or error"):
        s.statuses()


def test_atomic_write_bytes_takes_chunks(tmp_path: Path) -> None:
    """Chunks are written as they come and the file appears only once all are written: a
    chunk source that fails leaves no file (and no temp file) behind."""
    from t2i_eval.store import atomic_write_bytes

    path = tmp_path / "out.csv"
    atomic_write_bytes(path, (f"{i}\n".encode() for i in range(3)))
    assert path.read_bytes() == b"0\n1\n2\n"

    def failing() -> Iterator[bytes]:
        yield b"partial\n"
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(tmp_path / "other.csv", failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
