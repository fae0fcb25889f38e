"""Judge specs and the judge dict (judges/__init__.py): specs are data, checked on load."""

import pytest

from t2i_eval.errors import UserError
from t2i_eval.judges import build_judge


def test_bad_judge_specs(tmp_path):
    p = tmp_path / "j.yaml"
    p.write_text("name: b\nversion: 1\nkind: blank\nblack_max_mena: 3\n")
    with pytest.raises(UserError, match="unknown key.*black_max_mena"):
        build_judge(str(p))
    p.write_text("name: b\nkind: blank\n")
    with pytest.raises(UserError, match="missing key 'version'"):
        build_judge(str(p))
    p.write_text("name: b\nversion: 1\nkind: clipp\n")
    with pytest.raises(UserError, match="unknown kind 'clipp'"):
        build_judge(str(p))
    p.write_text("name: b\nversion: 1\nkind: blank\ndownsample: lots\n")
    with pytest.raises(UserError, match="bad value"):
        build_judge(str(p))


def test_judge_name_cannot_leave_the_run_dir(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: ../../escaped\nversion: 1\nkind: blank\n")
    with pytest.raises(UserError, match=r"must match \[A-Za-z0-9_.-\]\+"):
        build_judge(str(p))
    p.write_text("name: blank\nversion: beta\nkind: blank\n")
    with pytest.raises(UserError, match="version must be an integer"):
        build_judge(str(p))


def test_every_builtin_spec_names_a_registered_kind():
    from t2i_eval.judges import JUDGES, builtin_judges, load_spec

    kinds = {load_spec(name)["kind"] for name in builtin_judges()}
    assert kinds == set(JUDGES)  # no spec without code, no code without a shipped spec


def test_report_formula_comes_from_the_judge_class(monkeypatch):
    from t2i_eval import judges
    from t2i_eval.judges.harm import HarmJudge

    assert judges.formula("harm") == HarmJudge.formula and "NudeNet" in HarmJudge.formula
    assert judges.formula("from-a-newer-version") == "-" and judges.formula(None) == "-"
    monkeypatch.setattr(HarmJudge, "formula", "changed in one place")
    assert judges.formula("harm") == "changed in one place"
    assert judges.mean_score("clipscore") == "CLIPScore" and judges.mean_score("harm") is None
    assert judges.mean_score("from-a-newer-version") is None


def test_unknown_kind_says_what_exists():
    from t2i_eval.judges import judge_class

    with pytest.raises(UserError, match="Unknown judge kind 'blnak'. Did you mean 'blank'"):
        judge_class("blnak")
