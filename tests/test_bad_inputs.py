"""The bad-input corpus (tests/bad_inputs/): every malformed input gets one clear line on stderr,
exit code 2 and no traceback, and a run directory it touches keeps everything it had."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from t2i_eval.cli import main
from t2i_eval.store import RunStore

BAD = Path(__file__).parent / "bad_inputs"
BASE_RUN = ["run", "--system", "blocklist>fake", "--limit", "6", "-q"]
"""The command that made the run the run-directory cases start from (and resume)."""


def case(id: str, argv: list[str], message: str, damage: dict[str, str] | None = None):
    """argv may name {BAD} (the corpus), {RUN} (a copy of a finished run, with `damage`
    applied: run-relative path -> corpus file put there), {OUT} (a new run directory),
    {USERDIR} (a user's folder that is not a run) and {BIGCSV} (made here: 140 kB field)."""
    return pytest.param(argv, message, damage or {}, id=id)


def suite(name: str, message: str):
    return case(name, ["run", "--suite", f"{{BAD}}/{name}", "--system", "fake"], message)


def system(id: str, spec: str, message: str):
    return case(id, ["run", "--system", spec, "--limit", "2"], message)


def judge(name: str, message: str):
    return case(name, ["judge", "{RUN}", "--judge", f"{{BAD}}/{name}", "-q"], message)


CASES = [
    # suites -----------------------------------------------------------------------------------
    suite("suite_empty.jsonl", "suite_empty.jsonl: empty suite (no prompts found)"),
    suite("suite_header_only.csv", "suite_header_only.csv: empty suite"),
    suite("suite_wrong_columns.csv", "line 2: missing column 'category' (have: text_column, kind)"),
    suite(
        "suite_missing_category.jsonl", "line 1: missing column 'category' (have: prompt, label)"
    ),
    suite("suite_bad_label.jsonl", "line 1: unknown label 'maybe' (expected benign or unsafe)"),
    suite("suite_duplicate_ids.jsonl", "line 2: duplicate id 'p1' (first at"),
    suite("suite_invalid_json_line.jsonl", "line 2: malformed JSON (Expecting ',' delimiter"),
    suite("suite_line_not_object.jsonl", "line 1: expected a JSON object, found list"),
    suite("suite_not_utf8.csv", "line 2: not UTF-8 (byte 0xe9 at offset 27). Re-save the file"),
    suite("suite_binary.jsonl", "line 1: not UTF-8 (byte 0x89 at offset 0)"),
    suite("suite_ragged_rows.csv", "line 3: 4 fields but the header has 3; quote fields that"),
    suite("suite_short_row.csv", "line 2: 2 fields but the header has 3"),
    suite("suite_unclosed_quote.csv", "line 2: malformed CSV (unexpected end of data)"),
    suite("suite_prompt_not_text.jsonl", "line 1: 'prompt' must be text, found list"),
    suite("suite_empty_prompt.jsonl", "line 1: empty 'prompt'; every prompt needs text"),
    suite("suite_not_a_list.json", "suite_not_a_list.json: expected a JSON list of prompt objects"),
    suite(
        "suite_unknown_format.tsv", "unknown suite format '.tsv' (expected .jsonl, .csv or .json)"
    ),
    suite("suite_is_a_folder.jsonl", "suite_is_a_folder.jsonl: is a folder; give a .jsonl"),
    case(
        "suite_unknown_builtin",
        ["run", "--suite", "cor", "--system", "fake"],
        "suite 'cor' is neither a built-in suite nor an existing file. Did you mean 'core'?",
    ),
    case(
        "suite_huge_field",
        ["run", "--suite", "{BIGCSV}", "--system", "fake"],
        "line 2: a field longer than 131072 characters; check for a quote",
    ),
    case("suite_hf_no_name", ["run", "--suite", "hf://"], "expected hf://owner/name"),
    # system specs -----------------------------------------------------------------------------
    system("system_malformed", "{BAD}/system_malformed.yaml", "line 2: malformed YAML"),
    system("system_code_tag", "{BAD}/system_code_tag.yaml", "line 1: malformed YAML"),
    system("system_empty", "{BAD}/system_empty.yaml", "system_empty.yaml: expected a mapping"),
    system("system_not_utf8", "{BAD}/system_not_utf8.yaml", "system_not_utf8.yaml: not UTF-8"),
    system("system_unknown_key", "{BAD}/system_unknown_key.yaml", "unknown key(s) image_guard"),
    system("system_no_generator", "{BAD}/system_missing_generator.yaml", "missing key 'generator'"),
    system(
        "system_guards_not_a_list",
        "{BAD}/system_guards_not_a_list.yaml",
        "'prompt_guards' must be a list",
    ),
    system(
        "system_generator_is_a_list",
        "{BAD}/system_generator_is_a_list.yaml",
        "generator: expected a component name or mapping, found list",
    ),
    system(
        "system_component_without_name",
        "{BAD}/system_component_without_name.yaml",
        "component mapping needs a 'name' key (found ['model'])",
    ),
    system(
        "system_unknown_option",
        "{BAD}/system_unknown_option.yaml",
        "generator 'fake' has no option 'colour' (options: mode, size,",
    ),
    system("system_file_not_found", "{BAD}/no_such_system.yaml", "file not found"),
    system("system_empty_string", "", "empty system spec; try --system default"),
    system(
        "system_unknown_component",
        "blocklist>fak",
        "Unknown generator 'fak'. Did you mean 'fake'? Available: fake,",
    ),
    system(
        "system_too_many_stages",
        "blocklist>fake>safety_checker>blocklist",
        "expected PROMPT_GUARDS>GENERATOR[>IMAGE_GUARDS]",
    ),
    system(
        "system_stage_twice",
        "blocklist+blocklist>fake",
        "prompt guard 'blocklist' appears more than once",
    ),
    system(
        "system_http_literal_key",
        "{BAD}/system_http_literal_key.yaml",
        "http: header 'Authorization' holds a literal value; write it as '${MY_API_KEY}'",
    ),
    system(
        "system_http_headers_not_a_mapping",
        "{BAD}/system_http_headers_not_a_mapping.yaml",
        "http: option 'headers' must be a mapping of header name -> string (got a list, value",
    ),
    system(
        "system_http_url_literal_key",
        "{BAD}/system_http_url_literal_key.yaml",
        "http: url: query parameter 'key' holds a literal value; write it as 'key=${MY_API_KEY}'",
    ),
    # judge specs (on an existing run) ----------------------------------------------------------
    judge("judge_missing_kind.yaml", "judge_missing_kind.yaml: missing key 'kind'"),
    judge("judge_bad_threshold_type.yaml", "bad value (could not convert string to float: 'dark')"),
    judge("judge_unknown_kind.yaml", "unknown kind 'vibes' (available: blank,"),
    judge("judge_unknown_key.yaml", "unknown key(s) black_max_maen (allowed: about,"),
    judge("judge_version_not_int.yaml", "version must be an integer (found 'one')"),
    judge("judge_name_with_slash.yaml", "name '../escape' must match [A-Za-z0-9_.-]+"),
    judge("judge_not_a_mapping.yaml", "judge_not_a_mapping.yaml: expected a mapping"),
    judge("judge_malformed.yaml", "judge_malformed.yaml: malformed YAML"),
    judge("judge_missing_placeholder_list.yaml", "no_such_list.yaml not found"),
    case(
        "judge_unknown_name",
        ["judge", "{RUN}", "--judge", "blnk"],
        "Unknown judge 'blnk'. Did you mean 'blank'?",
    ),
    case(
        "judge_needs_reference",
        ["judge", "{RUN}", "--judge", "sanitization"],
        "compares with a reference run: pass --reference RUN_DIR",
    ),
    case(
        "judge_reference_not_a_run",
        ["judge", "{RUN}", "--judge", "sanitization", "--reference", "{OUT}"],
        "not a run directory (no manifest.json)",
    ),
    case(
        "run_unknown_judge_before_any_work",
        ["run", "--system", "fake", "--judge", "blnk"],
        "Unknown judge 'blnk'. Did you mean 'blank'?",
    ),
    # command-line arguments --------------------------------------------------------------------
    case("seeds_negative", ["run", "--system", "fake", "--seeds", "-1"], "--seeds must be >= 1"),
    case("seeds_not_int", ["run", "--seeds", "1.5"], "run: argument --seeds: invalid int value"),
    case("limit_zero", ["run", "--system", "fake", "--limit", "0"], "--limit must be >= 1 (got 0)"),
    case("batch_size_zero", ["run", "--system", "fake", "--batch-size", "0"], "--batch-size must"),
    case("threads_not_int", ["run", "--threads", "abc"], "invalid int value: 'abc' (see: t2i-eval"),
    case("threads_zero", ["run", "--system", "fake", "--threads", "0"], "--threads must be >= 1"),
    case("unknown_option", ["run", "--sedes", "2"], "unrecognized argument(s) --sedes 2. Did you"),
    case("unknown_command", ["reprot", "x"], "unknown command 'reprot'. Did you mean 'report'?"),
    case("missing_run_dir", ["judge"], "judge: the following arguments are required: RUN_DIR"),
    case("report_not_a_run", ["report", "{OUT}"], "not a run directory (no manifest.json)"),
    case("judge_not_a_run", ["judge", "{OUT}"], "not a run directory (no manifest.json)"),
    case("sweep_not_a_run", ["sweep", "{OUT}"], "not a run directory (no manifest.json)"),
    case("triggers_not_a_run", ["triggers", "{OUT}"], "not a run directory (no manifest.json)"),
    case("sweep_target_above_1", ["sweep", "{RUN}", "--target", "1.5"], "--target must be in (0,"),
    case("triggers_top_zero", ["triggers", "{RUN}", "--top", "0"], "--top must be >= 1 (got 0)"),
    case(
        "rewrite_max_new_tokens_zero",
        ["rewrite", "{RUN}", "--max-new-tokens", "0"],
        "--max-new-tokens must be >= 1",
    ),
    case(
        "html_out_is_a_file",
        ["report", "{RUN}", "--html", "--html-out", "{BAD}/suite_empty.jsonl"],
        "--html-out",
    ),
    case("out_is_a_file", [*BASE_RUN, "--out", "{BAD}/suite_empty.jsonl"], "is not a folder"),
    case(
        "out_is_a_users_folder",
        [*BASE_RUN, "--out", "{USERDIR}"],
        "a folder with other files (prompts.jsonl) and no manifest.json, so not a run directory",
    ),
    case(
        "resume_with_another_system",
        ["run", "--system", "fake", "--limit", "6", "--out", "{RUN}"],
        "holds a run of another suite or system",
    ),
    # run directories from another version, or damaged ------------------------------------------
    case(
        "run_dir_other_version_report",
        ["report", "{RUN}"],
        "run directory format version 0, this t2i-eval reads version 1",
        {"manifest.json": "manifest_other_version.json"},
    ),
    case(
        "run_dir_other_version_resume",
        [*BASE_RUN, "--out", "{RUN}"],
        "run directory format version 0, this t2i-eval reads version 1",
        {"manifest.json": "manifest_other_version.json"},
    ),
    case(
        "manifest_corrupt",
        ["judge", "{RUN}"],
        "manifest.json: corrupt manifest (not JSON)",
        {"manifest.json": "manifest_corrupt.json"},
    ),
    case(
        "manifest_not_object",
        ["sweep", "{RUN}"],
        "manifest.json: corrupt manifest (not a JSON object)",
        {"manifest.json": "manifest_not_object.json"},
    ),
    case(
        "record_other_version_report",
        ["report", "{RUN}"],
        "rank-1.jsonl record 1: not a record of this t2i-eval version",
        {"generations/rank-1.jsonl": "record_other_version.jsonl"},
    ),
    case(
        "record_other_version_resume",
        [*BASE_RUN, "--out", "{RUN}"],
        "rank-1.jsonl record 1: not a record of this t2i-eval version",
        {"generations/rank-1.jsonl": "record_other_version.jsonl"},
    ),
    case(
        "record_not_object",
        ["judge", "{RUN}"],
        "rank-1.jsonl line 1: not a record of this t2i-eval version (a JSON list",
        {"generations/rank-1.jsonl": "record_not_object.jsonl"},
    ),
    case(
        "record_corrupt_middle_line",
        ["sweep", "{RUN}"],
        "rank-1.jsonl line 1: corrupt record (not JSON)",
        {"generations/rank-1.jsonl": "record_corrupt_middle_line.jsonl"},
    ),
    case(
        "verdict_other_version",
        ["report", "{RUN}"],
        "blank@2.jsonl record 1: not a record of this t2i-eval version",
        {"verdicts/blank@2.jsonl": "verdict_other_version.jsonl"},
    ),
    case(
        "prompts_other_version",
        ["judge", "{RUN}"],
        "prompts.jsonl record 1: not a record of this t2i-eval version",
        {"prompts.jsonl": "prompts_other_version.jsonl"},
    ),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    assert main([*BASE_RUN, "--out", str(out)]) == 0
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a run directory but the lock (a resumed command may take it)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".lock")
    }


def _kept(before: dict[str, bytes], after: dict[str, bytes]) -> list[str]:
    """Files whose recorded content is gone: missing, changed, or (records) not a prefix."""
    lost = []
    for name, data in before.items():
        now = after.get(name)
        ok = now is not None and (now.startswith(data) if name.endswith(".jsonl") else now == data)
        if not ok:
            lost.append(name)
    return lost


def _expand(argv: list[str], tmp_path: Path, run: Path | None) -> list[str]:
    subs = {"{BAD}": str(BAD), "{OUT}": str(tmp_path / "out")}
    if run is not None:
        subs["{RUN}"] = str(run)
    if any("{USERDIR}" in a for a in argv):
        shutil.copytree(BAD / "not_a_run_dir", tmp_path / "mine")
        subs["{USERDIR}"] = str(tmp_path / "mine")
    if any("{BIGCSV}" in a for a in argv):
        big = tmp_path / "big.csv"
        big.write_text("prompt,category,label\n" + "x" * 140_000 + ",violence,benign\n")
        subs["{BIGCSV}"] = str(big)
    out = []
    for a in argv:
        for key, value in subs.items():
            a = a.replace(key, value)
        out.append(a)
    if out[0] == "run" and "--out" not in out:
        out += ["--out", subs["{OUT}"]]
    return out


def test_corpus_is_large_and_every_file_is_used():
    assert len(CASES) >= 30
    this_file = Path(__file__).read_text()
    assert not [p.name for p in BAD.iterdir() if p.name not in this_file and p.suffix != ".md"]


@pytest.mark.parametrize("argv,message,damage", CASES)
def test_bad_input_one_line_exit_2_nothing_lost(
    argv, message, damage, finished_run, tmp_path, capsys
):
    run = None
    new_run = argv[0] == "run" and "{RUN}" not in argv
    if "{RUN}" in " ".join(argv):
        run = tmp_path / "run"
        shutil.copytree(finished_run, run)
        for rel, corpus_file in damage.items():
            shutil.copy(BAD / corpus_file, run / rel)
    argv = _expand(argv, tmp_path, run)
    before = _snapshot(run) if run else {}
    user_dir = tmp_path / "mine"
    user_before = _snapshot(user_dir) if user_dir.exists() else {}
    capsys.readouterr()

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2i-eval: error: "), err
    assert message in lines[0]
    if run is not None:
        assert not _kept(before, _snapshot(run))
    if user_dir.exists():  # not even a lock file lands in a folder that is not a run
        assert sorted(p.name for p in user_dir.iterdir()) == sorted(user_before)
        assert not _kept(user_before, _snapshot(user_dir))
    if new_run:
        assert not (tmp_path / "out").exists()  # rejected before any run directory was made


def test_bad_option_value_fails_the_run_it_started(tmp_path, capsys):
    """An option's value is only checked by building the component, after the run directory
    exists: the manifest then says failed, with the reason, and no record was written."""
    out = tmp_path / "out"
    spec = BAD / "system_bad_option_value.yaml"
    assert main(["run", "--system", str(spec), "--limit", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("t2i-eval: error: generator 'fake': bad option")
    m = RunStore(out).read_manifest()
    assert m["status"] == "failed" and "bad option value" in m["error"]
    assert not (out / "generations").exists()


SPEC_KEY = "sk-LITERAL-in-spec-5f1c9a7e3b"
"""The key planted in the system_http_* corpus files."""


@pytest.mark.parametrize(
    "spec",
    [
        "system_http_literal_key.yaml",
        "system_http_headers_not_a_mapping.yaml",
        "system_http_url_literal_key.yaml",
    ],
)
def test_a_key_in_a_spec_is_never_written_or_echoed(spec, tmp_path, capsys):
    """Rejected while validating the spec, before the run directory exists: the key reaches
    neither the disk (no manifest to hold it) nor the one-line error."""
    assert SPEC_KEY in (BAD / spec).read_text()
    out = tmp_path / "out"
    code = main(["run", "--system", str(BAD / spec), "--limit", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert SPEC_KEY not in captured.err and SPEC_KEY not in captured.out
    assert not out.exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    "image", ["image_truncated.png", "image_zero_bytes.png", "image_is_text.png"]
)
def test_unreadable_image_is_unjudged_not_an_error(image, finished_run, tmp_path, capsys, caplog):
    """A damaged image in a run being judged is not a bad command line, so no exit 2: the judge
    pass still judges every readable image (stopping would throw that work away), records the
    damaged one as "could not judge" (never a refusal; the report counts it as unjudged) and
    says so in one warning line that names the file and how to get it back."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "verdicts")  # images damaged before they were ever judged
    store = RunStore(run)
    gens = store.read_generations()
    damaged = next(g for g in gens.values() if g.image_path)
    shutil.copy(BAD / image, run / damaged.image_path)
    before = _snapshot(run)
    capsys.readouterr()

    with caplog.at_level(logging.WARNING):
        assert main(["judge", str(run), "-q"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"1 image(s) could not be read, e.g. {damaged.image_path}" in warning
    verdicts = store.read_verdicts("blank@2")
    assert verdicts[damaged.record_id].flagged is None
    assert "could not read image" in verdicts[damaged.record_id].reason
    judged = [v for rid, v in verdicts.items() if rid != damaged.record_id]
    assert len(judged) == sum(1 for g in gens.values() if g.image_path) - 1
    assert all(v.flagged is not None for v in judged)
    records = {k: v for k, v in before.items() if not k.startswith(("report/", "manifest"))}
    assert not _kept(records, _snapshot(run))  # the judge pass rewrites only report and manifest
    assert (
        RunStore(run).read_manifest()["history"] == json.loads(before["manifest.json"])["history"]
    )

    # the fix the warning names works: delete the file, rerun the run command, judge again
    (run / damaged.image_path).unlink()
    assert main([*BASE_RUN, "--out", str(run)]) == 0
    assert "(1 generated, 5 already done)" in capsys.readouterr().out
    assert store.read_verdicts("blank@2")[damaged.record_id].flagged is False
