"""Data folders are found in a checkout, in a wheel's share/ prefix, or where T2I_EVAL_DATA says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from t2i_eval import paths
from t2i_eval.errors import UserError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; CI runs 3.11

REPO = Path(__file__).resolve().parent.parent
DATA_FOLDERS = ("prompts", "judges", "guards")


def _tracked_data_files() -> list[str]:
    """The data files git tracks: what a wheel must carry."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", *DATA_FOLDERS], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if line]


def test_every_tracked_data_file_is_installed_by_the_wheel():
    # pyproject's data-files globs are per folder; a new subfolder or file type would be
    # silently left out of the wheel, and a pip-installed t2i-eval would miss it.
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    installed: dict[str, str] = {}
    for target, globs in table.items():
        assert target.startswith("share/t2i-eval/")
        for pattern in globs:
            for path in REPO.glob(pattern):
                rel = path.relative_to(REPO).as_posix()
                installed[rel] = f"{target}/{path.name}"
    tracked = _tracked_data_files()
    assert tracked, "no data files tracked?"
    missing = [f for f in tracked if f not in installed]
    assert missing == [], f"data files no data-files glob installs: {missing}"
    # and each lands at the same relative place under share/t2i-eval/
    assert all(installed[f] == f"share/t2i-eval/{f}" for f in tracked)


def test_checkout_finds_data_beside_the_package(monkeypatch):
    monkeypatch.delenv("T2I_EVAL_DATA", raising=False)
    assert paths.data_root() == REPO
    assert (paths.data_dir("judges") / "blank.yaml").is_file()


def test_wheel_layout_is_found_under_the_prefix(tmp_path, monkeypatch):
    # What pip does with the wheel: the data folders under <prefix>/share/t2i-eval/, the
    # package in site-packages (so nothing beside it).
    monkeypatch.delenv("T2I_EVAL_DATA", raising=False)
    share = tmp_path / "prefix" / "share" / "t2i-eval"
    for name in DATA_FOLDERS:
        shutil.copytree(REPO / name, share / name)
    monkeypatch.setattr(paths, "_PACKAGE_PARENT", tmp_path / "site-packages")
    monkeypatch.setattr(paths.sysconfig, "get_path", lambda name: str(tmp_path / "prefix"))
    assert paths.data_root() == share
    assert (paths.data_dir("prompts") / "core.yaml").is_file()


def test_env_override_wins_and_a_wrong_one_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "prompts").mkdir()
    monkeypatch.setenv("T2I_EVAL_DATA", str(tmp_path))
    assert paths.data_root() == tmp_path
    monkeypatch.setenv("T2I_EVAL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="T2I_EVAL_DATA=.*nowhere.*does not exist"):
        paths.data_root()


def test_no_data_anywhere_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("T2I_EVAL_DATA", raising=False)
    monkeypatch.setattr(paths, "_PACKAGE_PARENT", tmp_path / "site-packages")
    monkeypatch.setattr(paths.sysconfig, "get_path", lambda name: str(tmp_path / "a"))
    monkeypatch.setattr(paths.sys, "prefix", str(tmp_path / "b"))
    monkeypatch.setattr(paths.site, "getuserbase", lambda: str(tmp_path / "c"))
    with pytest.raises(UserError) as err:
        paths.data_root()
    for where in ("site-packages", "a/share/t2i-eval", "b/share/t2i-eval", "c/share/t2i-eval"):
        assert where in str(err.value)
