"""Report outputs that cannot be turned against their reader, and are never half-written.

Names and prompt text come from user files: in Markdown they must stay text (no HTML, no extra
table column), in CSV they must not start a spreadsheet formula; an HTML report must show each
run's own images, survive missing ones, and an interrupted write must leave the old output.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from t2i_eval import outputs, sweep
from t2i_eval.cli import main
from t2i_eval.errors import UserError
from t2i_eval.outputs import FORMULA_START, csv_bytes, md_cell, md_code, replacing_dir
from t2i_eval.report import html as report_html

HOSTILE = "<script>alert(1)</script>|x`y"
#: What the suite loader keeps of HOSTILE as a category (lower case, `/` becomes `_`).
HOSTILE_CATEGORY = "<script>alert(1)<_script>|x`y"
SYSTEM_NAME = "<b>sys|tem`"
MATHTEXT = "$\\frac$"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run whose suite file name, system name and categories carry markup, and whose
    benign prompts (refused by the blocklist) start with spreadsheet formula characters."""
    tmp = tmp_path_factory.mktemp("hostile")
    suite = tmp / "evil<i>|`.jsonl"
    rows = [
        ("a knife on a table", HOSTILE, "benign"),
        ("stab someone with a knife", HOSTILE, "unsafe"),
        ('=HYPERLINK("http://example.invalid","knife")', "=cmd", "benign"),
        ("+ a knife on a table", "+plus", "benign"),
        ("stab a person with a knife", "@at", "unsafe"),
        ("a $5 knife", MATHTEXT, "benign"),  # a plot label, not a formula for matplotlib
    ]
    suite.write_text(
        "\n".join(json.dumps({"prompt": t, "category": c, "label": lab}) for t, c, lab in rows)
    )
    system = tmp / "sys.yaml"
    system.write_text(
        f"name: {json.dumps(SYSTEM_NAME)}\nprompt_guards: [blocklist]\ngenerator: fake\n"
    )
    out = tmp / "run"
    argv = ["run", "--suite", str(suite), "--system", str(system), "-q", "--out", str(out)]
    assert main(argv) == 0
    return out


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


# Markdown ---------------------------------------------------------------------------------


def test_md_cell_leaves_no_markup():
    cell = md_cell("<img src=x onerror=alert(1)> a|b `c` [l](javascript:x) \\| d\ne\x1b[31m")
    assert "<" not in cell and ">" not in cell and "\n" not in cell and "\x1b" not in cell
    assert _unescaped_pipes(cell) == 0
    assert re.search(r"(?<!\\)[`\[\]]", cell) is None  # no code span, no link can open
    assert md_cell("violence") == "violence" and md_cell("self_harm") == "self_harm"


def test_md_code_fence_outlasts_backticks_inside():
    assert md_code("/runs/a") == "`/runs/a`"
    assert md_code("a``b") == "```a``b```"
    assert md_code("`x") == "`` `x ``"


def test_report_md_keeps_names_as_text(hostile_run: Path):
    md_it = pytest.importorskip("markdown_it")
    text = (hostile_run / "report" / "report.md").read_text()
    assert "<script" not in text and "<b>" not in text and "<i>" not in text
    header = next(x for x in text.splitlines() if x.startswith("| category | benign over"))
    rows = [x for x in text.splitlines() if x.startswith(f"| {md_cell(HOSTILE_CATEGORY)} |")]
    assert len(rows) == 1 and _unescaped_pipes(rows[0]) == _unescaped_pipes(header)
    # a CommonMark renderer that passes raw HTML through shows the names as text
    html = md_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(text)
    assert "<script" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(1)&lt;_script&gt;|x`y</td>" in html
    assert "&lt;b&gt;sys|tem`" in html and "evil&lt;i&gt;|`" in html
    first_row = html.split("<tbody>")[1].split("</tr>")[0]
    assert first_row.count("<td>") == header.count("|") - 1  # no extra column


def test_triggers_and_predictor_tables_escape_words_and_categories():
    from t2i_eval.predictor import predictor_section
    from t2i_eval.triggers import triggers_section

    loo = {
        "guards": {
            "g|<x>": {
                "categories": {
                    HOSTILE: {"refused": 1, "explained_by_one_word": 1, "top": [("<b>|", 1)]}
                },
                "not_reproduced": 0,
            }
        }
    }
    pred = {
        "folds": 2,
        "cv_accuracy": 0.5,
        "majority_baseline": 0.5,
        "cv_auroc": 0.5,
        "n_prompts": 10,
        "refused": 5,
        "top_ngrams": {HOSTILE: [("a|`b`", 1.0)]},
    }
    for section in (triggers_section(loo), predictor_section(pred)):
        table = [x for x in section.splitlines() if x.startswith("|")]
        assert "<" not in section
        assert len({_unescaped_pipes(x) for x in table}) == 1  # every row as wide as the header


# CSV --------------------------------------------------------------------------------------


def test_csv_cells_that_start_a_formula_get_a_quote():
    rows = [[start + "1+1", -0.5, 3, None] for start in FORMULA_START] + [["a=b", "", 0.0, "x"]]
    back = list(csv.reader(io.StringIO(csv_bytes(["c", "n", "k", "z"], rows).decode(), newline="")))
    assert [r[0] for r in back[1:]] == [f"'{s}1+1" for s in FORMULA_START] + ["a=b"]
    assert {r[1] for r in back[1:-1]} == {"-0.5"}  # numbers stay numbers
    dict_rows = csv_bytes(["category"], [{"category": "@SUM(A1)"}]).decode().splitlines()
    assert dict_rows == ["category", "'@SUM(A1)"]


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(newline="")))


def test_report_sweep_and_triggers_csvs_neutralise_formulas(hostile_run: Path):
    per_cat = _csv(hostile_run / "report" / "per_category.csv")
    per_prompt = _csv(hostile_run / "report" / "per_prompt.csv")
    for rows in (per_cat, per_prompt):
        cats = {r["category"] for r in rows}
        assert {"'=cmd", "'+plus", "'@at"} <= cats and not cats & {"=cmd", "+plus", "@at"}
    assert {r["system"] for r in per_cat} == {SYSTEM_NAME}  # other text is written as it is
    assert main(["sweep", str(hostile_run), "--no-plots"]) == 0
    curve = _csv(hostile_run / "sweep" / "curve.csv")
    assert "'=cmd" in {r["category"] for r in curve}
    assert [float(r["threshold"]) for r in curve]  # numbers, never a quoted "'-1.0"
    assert main(["triggers", str(hostile_run), "-q"]) == 0
    texts = {r["text"] for r in _csv(hostile_run / "triggers" / "loo.csv")}
    assert '\'=HYPERLINK("http://example.invalid","knife")' in texts
    assert "'+ a knife on a table" in texts


# HTML -------------------------------------------------------------------------------------


def test_html_report_escapes_names_and_plots_them_as_text(hostile_run: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "html"
    assert main(["report", str(hostile_run), "--html", "--html-out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "<script" not in page and "<b>sys" not in page
    assert "&lt;script&gt;alert(1)&lt;_script&gt;|x`y" in page
    assert "&lt;b&gt;sys|tem`" in page
    assert f"<td>{MATHTEXT}</td>" in page  # and its plots were drawn (no mathtext error)


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two runs of one suite (same record ids) whose blacked-out benign images differ in size."""
    tmp = tmp_path_factory.mktemp("sizes")
    runs = []
    for size in (32, 48):
        spec = tmp / f"s{size}.yaml"
        spec.write_text(
            f"name: dark-{size}\ngenerator: {{name: fake, size: {size}, "
            "black_words: [blood, naked]}\n"
        )
        runs.append(tmp / f"run{size}")
        assert main(["run", "--system", str(spec), "--out", str(runs[-1]), "-q"]) == 0
    return tmp, runs[0], runs[1]


def _gallery(page: str, run: int) -> list[str]:
    section = page.split(f"<section id='run-{run}'>")[1].split("</section>")[0]
    return re.findall(r'<img loading="lazy" src="([^"]+)"', section)


def test_compare_report_shows_each_runs_own_thumbnails(two_sizes):
    pytest.importorskip("matplotlib")
    from PIL import Image

    tmp, a, b = two_sizes
    out = tmp / "compare"
    assert main(["report", str(a), str(b), "--html", "--html-out", str(out)]) == 0
    page = (out / "index.html").read_text()
    shown = {run: _gallery(page, run) for run in (0, 1)}
    assert shown[0] and shown[1]
    for run, size in ((0, 32), (1, 48)):
        for src in shown[run]:
            with Image.open(out / src) as im:
                assert im.size == (size, size), (run, src)
    assert not set(shown[0]) & set(shown[1])


def test_missing_and_non_image_files_become_placeholders(two_sizes, caplog):
    pytest.importorskip("matplotlib")
    tmp, a, _ = two_sizes
    work = tmp / "broken"
    shutil.copytree(a, work)
    out = tmp / "broken-html"
    assert main(["report", str(work), "--html", "--html-out", str(out)]) == 0
    shown = _gallery((out / "index.html").read_text(), 0)
    gone, junk = (work / "images" / Path(src).name for src in shown[:2])
    gone.unlink()
    junk.write_bytes(b"not a png")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(work), "--html", "--html-out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert page.count("class='missing'") == 2 and len(_gallery(page, 0)) == len(shown) - 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(gone) in w for w in warned) and any(str(junk) in w for w in warned)
    assert all("\n" not in w for w in warned)


def test_uncreatable_html_out_is_one_line_exit_2(two_sizes, capsys):
    tmp, a, _ = two_sizes
    blocker = tmp / "a-file"
    blocker.write_text("x")
    capsys.readouterr()
    assert main(["report", str(a), "--html", "--html-out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker / "sub") in err and "--html-out" in err


def test_html_out_with_foreign_files_is_refused_not_deleted(two_sizes, capsys):
    tmp, a, _ = two_sizes
    mine = tmp / "my-folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["report", str(a), "--html", "--html-out", str(mine)]) == 2
    assert "thesis.tex" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


# atomic output folders --------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


def _fail_after(monkeypatch: pytest.MonkeyPatch, module: object, name: str, calls: int) -> None:
    """Make `module.name` raise on its call number `calls` + 1: a kill midway through a write."""
    real = getattr(module, name)
    seen = 0

    def failing(*args: object, **kwargs: object) -> object:
        nonlocal seen
        seen += 1
        if seen > calls:
            raise RuntimeError("killed midway")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def test_html_report_failing_midway_leaves_the_old_one(two_sizes, monkeypatch):
    pytest.importorskip("matplotlib")
    tmp, a, b = two_sizes
    out = tmp / "atomic-html"
    assert main(["report", str(a), "--html", "--html-out", str(out)]) == 0
    before = _snapshot(out)
    # run B's two figures are written, then the write dies
    _fail_after(monkeypatch, report_html, "atomic_write_bytes", 2)
    with pytest.raises(RuntimeError, match="killed midway"):
        report_html.write_html([b], out)
    assert _snapshot(out) == before and not _leftovers(out)


def test_sweep_failing_midway_leaves_the_old_one(hostile_run: Path, monkeypatch):
    pytest.importorskip("matplotlib")
    assert main(["sweep", str(hostile_run), "--no-plots"]) == 0
    out = hostile_run / "sweep"
    before = _snapshot(out)
    # this time with plots: the plot and curve.csv are written, proposed_thresholds.json fails
    _fail_after(monkeypatch, sweep, "atomic_write_json", 0)
    with pytest.raises(RuntimeError, match="killed midway"):
        sweep.run_sweep(hostile_run, target=0.5, plots=True)
    assert _snapshot(out) == before and not _leftovers(out)


def test_swap_failing_between_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "f").write_text("old")
    real = outputs.os.replace

    def second_rename_fails(src, dst):
        if ".out.new-" in Path(src).name:  # the new folder moving in
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"), replacing_dir(dest) as tmp:
        (tmp / "f").write_text("new")
    monkeypatch.undo()
    assert (dest / "f").read_text() == "old" and not _leftovers(dest)


def test_a_killed_builds_leftovers_are_tidied_or_restored(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(dead.stdout)
    dest = tmp_path / "out"
    (tmp_path / f".out.new-{pid}-00").mkdir()  # a half-built folder
    old = tmp_path / f".out.old-{pid}-00"  # killed between the renames: dest is missing
    old.mkdir()
    (old / "f").write_text("old")
    with replacing_dir(dest) as tmp:
        assert (dest / "f").read_text() == "old"  # readers see the old output again
        (tmp / "f").write_text("new")
    assert (dest / "f").read_text() == "new" and not _leftovers(dest)


def test_a_file_in_the_way_is_a_user_error(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(UserError, match="a file is in the way"), replacing_dir(tmp_path / "out"):
        pass
