"""The bad-input corpus (tests/bad_inputs/): every malformed input gets one clear line on stderr,
exit code 2 and no traceback, and a run directory it touches keeps everything it had."""

from __future__ import annotations

import json
import logging
import resource
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


RUN_FAKE = ["run", "--system", "fake", "--suite"]
_COMMANDS = {
    "report": ["report", "{RUN}"],
    "judge": ["judge", "{RUN}", "-q"],
    "sweep": ["sweep", "{RUN}"],
    "resume": [*BASE_RUN, "--out", "{RUN}"],
}


def damaged(id: str, command: str, rel: str, corpus: str, message: str):
    """A finished run with `rel` replaced by corpus entry `corpus` (a file, a folder, or
    {MADE:name}), then `command` (report, judge, sweep, resume) on it."""
    return case(id, _COMMANDS[command], message, {rel: corpus})


_DEEP = 100_000
#: Hostile files too large or too odd to keep in the corpus: made in the test's temp folder,
#: named {MADE:name} in argv or damage. `long_name` stands for a 1 MB system name.
MADE = {
    "deep.json": lambda p: p.write_text("[" * _DEEP + "]" * _DEEP),
    "deep_row.jsonl": lambda p: p.write_text(
        '{"prompt": "a", "category": "violence", "label": "benign", "x": '
        + "[" * _DEEP
        + "]" * _DEEP
        + "}\n"
    ),
    "deep_record.jsonl": lambda p: p.write_text(
        '{"record_id": ' + "[" * _DEEP + "]" * _DEEP + "}\n"
    ),
    "big_id.jsonl": lambda p: p.write_text(
        '{"id": ' + "9" * 5001 + ', "prompt": "a", "category": "violence", "label": "benign"}\n'
    ),
    "deep.yaml": lambda p: p.write_text("[" * _DEEP + "]" * _DEEP),
    "large.yaml": lambda p: p.write_text("generator: fake\n" + "# padding\n" * 200_000),
    "folder.yaml": lambda p: p.mkdir(),
    "probe_no_card": lambda p: p.mkdir(),
    "probe_card_not_json": lambda p: _guard_folder(p, "{not json"),
    "probe_card_foreign": lambda p: _guard_folder(p, '{"kind": "x"}'),
    "probe_card_encoder_id_number": lambda p: _guard_folder(p, _probe_card(encoder={"id": 5})),
    "probe_card_dim_vs_shapes": lambda p: _guard_folder(p, _probe_card(encoder={"dim": 8})),
    "probe_card_kind_vs_shapes": lambda p: _guard_folder(p, _probe_card(head={"kind": "mlp"})),
    "benign_only.jsonl": lambda p: p.write_text(
        "".join(
            f'{{"prompt": "a calm lake {i}", "category": "violence", "label": "benign"}}\n'
            for i in range(4)
        )
    ),
}


def _guard_folder(path: Path, card: str) -> None:
    """A `probe:DIR` folder whose guard.json holds `card`."""
    path.mkdir()
    (path / "guard.json").write_text(card)


_PROBE_CARD = {
    "kind": "t2i-eval probe",
    "card_version": 1,
    "train": [],
    "seed": 0,
    "train_text_sha256": [],
    "threshold": {"value": 0.5},
    "encoder": {"id": "minilm", "digest": "d", "weights": "pretrained", "dim": 4},
    "head": {
        "kind": "linear",
        "shapes": {"mean": [4], "scale": [4], "net.0.weight": [1, 4], "net.0.bias": [1]},
    },
}


def _probe_card(encoder: dict | None = None, head: dict | None = None) -> str:
    """A probe card that passes every check but the edited entry."""
    return json.dumps(
        {
            **_PROBE_CARD,
            "encoder": {**_PROBE_CARD["encoder"], **(encoder or {})},
            "head": {**_PROBE_CARD["head"], **(head or {})},
        }
    )



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
        "suite 'cor' is neither a built-in suite, a recipe nor an existing file. Did you mean 'core'?",
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
    judge("judge_malformed.yaml", "judge_malformed.yaml line 4: malformed YAML"),
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
        "rank-1.jsonl line 1: not a record of this t2i-eval version",
        {"generations/rank-1.jsonl": "record_other_version.jsonl"},
    ),
    case(
        "record_other_version_resume",
        [*BASE_RUN, "--out", "{RUN}"],
        "rank-1.jsonl line 1: not a record of this t2i-eval version",
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
        "blank@2.jsonl line 1: not a record of this t2i-eval version",
        {"verdicts/blank@2.jsonl": "verdict_other_version.jsonl"},
    ),
    case(
        "prompts_other_version",
        ["judge", "{RUN}"],
        "prompts.jsonl line 1: not a record of this t2i-eval version",
        {"prompts.jsonl": "prompts_other_version.jsonl"},
    ),
    # hostile suites: nesting, huge numbers, invisible characters, repeated columns -----------
    case("suite_json_nested_deep", [*RUN_FAKE, "{MADE:deep.json}"], "JSON nested too deeply"),
    case("suite_jsonl_row_nested_deep", [*RUN_FAKE, "{MADE:deep_row.jsonl}"], "line 1: JSON nested"),
    case("suite_id_5001_digits", [*RUN_FAKE, "{MADE:big_id.jsonl}"], "line 1: unreadable JSON value"),
    suite("suite_id_is_list.jsonl", "line 1: 'id' must be text or a number, found list"),
    suite("suite_id_too_long.jsonl", "line 1: 'id' is longer than 200 characters"),
    suite("suite_repeated_header.csv", "line 1: column 'category' appears more than once"),
    suite("suite_label_is_list.jsonl", "line 1: 'label' must be text, found list"),
    suite("suite_pair_id_object.jsonl", "line 1: 'pair_id' must be text or a number, found dict"),
    suite("suite_category_only_invisible.jsonl", "line 1: 'category' holds only invisible"),
    suite("suite_label_unknown_fullwidth.jsonl", "line 1: unknown label 'ＭＡＹＢＥ' (expected benign"),
    # option values: types, ranges, choices, checked before anything exists on disk ----------
    system("system_steps_negative", "{BAD}/system_steps_negative.yaml", "generator 'tiny': option 'steps' must be from 1 to 1000, found -5"),
    system("system_height_zero", "{BAD}/system_height_zero.yaml", "option 'height' must be from 8 to 4096, found 0"),
    system("system_width_huge", "{BAD}/system_width_huge.yaml", "option 'width' must be from 8 to 4096, found 100000"),
    system("system_fake_size_huge", "{BAD}/system_fake_size_huge.yaml", "option 'size' must be from 1 to 4096"),
    system("system_fake_size_negative", "{BAD}/system_fake_size_negative.yaml", "option 'size' must be from 1 to 4096, found -3"),
    system("system_trust_remote_code_string", "{BAD}/system_trust_remote_code_string.yaml", "option 'trust_remote_code' must be true or false, found text"),
    system("system_channels_last_string", "{BAD}/system_channels_last_string.yaml", "option 'channels_last' must be true or false, found text"),
    system("system_name_is_list", "{BAD}/system_name_is_list.yaml", "'name' must be text of 1 to 200 characters"),
    system("system_component_name_is_number", "{BAD}/system_component_name_is_number.yaml", "component 'name' must be text, found int"),
    system("system_dtype_typo", "{BAD}/system_dtype_typo.yaml", "option 'dtype' must be one of auto, float32, float16, bfloat16, found 'flaot16'"),
    system("system_device_typo", "{BAD}/system_device_typo.yaml", "option 'device' must be auto, cpu, mps, cuda or cuda:N, found 'gpu0'"),
    system("system_steps_float", "{BAD}/system_steps_float.yaml", "option 'steps' must be an integer, found a number"),
    system("system_steps_bool", "{BAD}/system_steps_bool.yaml", "option 'steps' must be an integer, found true/false"),
    system("system_threshold_nan", "{BAD}/system_threshold_nan.yaml", "prompt guard 'profanity': option 'threshold' must be a finite number"),
    system("system_threshold_text", "{BAD}/system_threshold_text.yaml", "option 'threshold' must be a number, found text"),
    system("system_guidance_infinite", "{BAD}/system_guidance_infinite.yaml", "option 'guidance' must be a finite number"),
    system("system_refuse_words_not_a_list", "{BAD}/system_refuse_words_not_a_list.yaml", "option 'refuse_words' must be a list of text or null, found text"),
    system("system_concept_batch_size_zero", "{BAD}/system_concept_batch_size_zero.yaml", "option 'batch_size' must be from 1 to 4096, found 0"),
    system("system_classifier_max_length_zero", "{BAD}/system_classifier_max_length_zero.yaml", "option 'max_length' must be from 1 to 100000, found 0"),
    system("system_fake_mode_unknown", "{BAD}/system_fake_mode_unknown.yaml", "option 'mode' must be one of solid, noise, found 'stripes'"),
    system("system_sld_level_unknown", "{BAD}/system_sld_level_unknown.yaml", "option 'safe' must be one of weak, medium, strong, max"),
    system("system_option_name_not_text", "{BAD}/system_option_name_not_text.yaml", "option names must be text, found int"),
    system("system_fake_delay_negative", "{BAD}/system_fake_delay_negative.yaml", "option 'delay' must be from 0 to 3600, found -1"),
    system("system_checker_dtype_typo", "{BAD}/system_checker_dtype_typo.yaml", "image guard 'safety_checker': option 'dtype' must be one of"),
    system("system_api_timeout_zero", "{BAD}/system_api_timeout_zero.yaml", "timeout"),
    system("system_blocklist_categories_text", "{BAD}/system_blocklist_categories_text.yaml", "option 'categories' must be a list of text or null, found text"),
    system("system_bad_option_value", "{BAD}/system_bad_option_value.yaml", "generator 'fake': option 'size' must be an integer, found text"),
    system(
        "system_thresholds_file_missing",
        "{BAD}/system_thresholds_file_missing.yaml",
        "profanity: thresholds file nope.json not found; expected a sweep's",
    ),
    system("system_empty_component_before_plus", "+>fake", "an empty component around '+'"),
    system("system_empty_component_after_plus", "blocklist+>fake", "an empty component around '+'"),
    # bounded resources: refused quickly, in little memory, with a short line -------------------
    system("system_alias_bomb", "{BAD}/system_alias_bomb.yaml", "expands to more than 100,000 values"),
    system("system_yaml_nested_deep", "{MADE:deep.yaml}", "nested more than 64 levels deep"),
    system("system_yaml_too_large", "{MADE:large.yaml}", "larger than 1 MiB; not a config file"),
    # trained guards (train-guard, probe:DIR) -------------------------------------------------------
    system("probe_no_card", "probe:{MADE:probe_no_card}", "guard.json not found"),
    system("probe_card_not_json", "probe:{MADE:probe_card_not_json}", "is not JSON"),
    system("probe_card_foreign", "probe:{MADE:probe_card_foreign}", "not a probe card"),
    system(
        "probe_card_encoder_id_number",
        "probe:{MADE:probe_card_encoder_id_number}",
        "encoder.id must be a non-empty string, found 5",
    ),
    system(
        "probe_card_dim_vs_shapes",
        "probe:{MADE:probe_card_dim_vs_shapes}",
        "do not fit head.kind 'linear' on encoder.dim 8",
    ),
    system(
        "probe_card_kind_vs_shapes",
        "probe:{MADE:probe_card_kind_vs_shapes}",
        "do not fit head.kind 'mlp' on encoder.dim 4",
    ),
    case(
        "train_guard_one_class",
        ["train-guard", "--train", "{MADE:benign_only.jsonl}", "--encoder", "clip-text:tiny",
         "--out", "{OUT}"],
        "benign prompts only",
    ),
    system("system_yaml_is_a_folder", "{MADE:folder.yaml}", "is a folder; give a YAML file"),
    system("system_name_megabyte", "{MADE:long_name}", "Unknown generator 'xxxx"),
    case("seeds_two_billion", ["run", "--system", "fake", "--seeds", "2000000000"], "more than one run plans (2,000,000); lower --seeds"),
    case("seeds_times_prompts_too_many", ["run", "--system", "fake", "--seeds", "10000"], "216 prompts x 10,000 seeds = 2,160,000 items"),
    # suite specs and recipes: every key, one line each -----------------------------------------
    suite("suitespec_no_name.yaml", "suitespec_no_name.yaml: 'name' is required: 1 to 80 letters"),
    suite("suitespec_name_bad_chars.yaml", "'name' is required: 1 to 80 letters, digits"),
    suite("suitespec_version_bool.yaml", "'version' must be a number or text"),
    suite("suitespec_unknown_key.yaml", "unknown key(s) colums. Did you mean 'columns'?"),
    suite("suitespec_format_unknown.yaml", "'format' must be one of columns, overt"),
    suite("suitespec_source_not_text.yaml", "'source' must be text, found list"),
    suite("suitespec_source_missing.yaml", "no_such_file.csv (relative to"),
    suite("suitespec_sha256_malformed.yaml", "'sha256' must be 64 hex digits"),
    suite("suitespec_sha256_mismatch.yaml", "the spec pins 000000000000...; the file changed"),
    suite("suitespec_license_not_text.yaml", "'license' must be text, found list"),
    suite("suitespec_columns_missing.yaml", "'columns' must map prompt (and optionally category, id)"),
    suite("suitespec_columns_no_prompt.yaml", "'columns' must map prompt"),
    suite("suitespec_columns_unknown_key.yaml", "columns: unknown key(s) text (allowed: prompt,"),
    suite("suitespec_columns_value_not_text.yaml", "columns.prompt must be a column name (text)"),
    suite("suitespec_column_not_in_file.yaml", "xstest_v2.csv line 2: no column 'question' (have: id,"),
    suite("suitespec_category_split_not_text.yaml", "'category_split' must be text, found list"),
    suite("suitespec_label_missing.yaml", "missing 'label': benign, unsafe, {column, map}"),
    suite("suitespec_label_bad_word.yaml", "label 'maybe' must be benign or unsafe"),
    suite("suitespec_label_map_bad_value.yaml", "label.map values must be benign or unsafe, found 'fine'"),
    suite("suitespec_label_map_misses_a_cell.yaml", "line 3: label cell 'unsafe' is not in label.map"),
    suite("suitespec_label_graded_inverted.yaml", "benign_at_most < unsafe_at_least"),
    suite("suitespec_label_graded_not_a_number.yaml", "line 2: graded label column 'type' holds 'homonyms'"),
    suite("suitespec_label_unknown_keys.yaml", "found keys column, threshold"),
    suite("suitespec_taxonomy_unknown.yaml", "unknown taxonomy 'i2q'. Did you mean 'i2p'?"),
    # (suitespec_taxonomy_file_bad.yaml names taxonomy_maps_to_unknown.yaml beside it)
    suite("suitespec_taxonomy_file_bad.yaml", "'homonyms' maps to 'wordplay'; map each name to one of"),
    suite("suitespec_pairs_missing_keys.yaml", "'pairs' needs exactly the keys benign, column"),
    suite("suitespec_pairs_bad_regex.yaml", "pairs.pattern is not a regular expression"),
    suite("suitespec_pairs_no_groups.yaml", "pairs.pattern needs named groups (?P<role>"),
    suite("suitespec_not_a_mapping.yaml", "suitespec_not_a_mapping.yaml: expected a mapping with keys"),
    case("recipe_unknown", [*RUN_FAKE, "i2q:{BAD}/suite_empty.jsonl"], "Did you mean 'i2p'?"),
    case("recipe_local_file_missing", [*RUN_FAKE, "coprov2:{BAD}/no_such.csv"], "no_such.csv is not a file"),
    case("recipe_without_a_source", [*RUN_FAKE, "coprov2"], "no source this tool can fetch; download it"),
    # outputs and the explorer ------------------------------------------------------------------
    case(
        "html_out_under_a_file",
        ["report", "{RUN}", "--html", "--html-out", "{BAD}/suite_empty.jsonl/sub"],
        "cannot create the output folder (",
    ),
    case(
        "html_out_is_a_users_folder",
        ["report", "{RUN}", "--html", "--html-out", "{USERDIR}"],
        "holds files this output does not own (prompts.jsonl)",
    ),
    case("explore_runs_dir_missing", ["explore", "{OUT}"], "not a directory; give the folder"),
    case(
        "explore_runs_dir_is_a_file",
        ["explore", "{BAD}/suite_empty.jsonl"],
        "not a directory; give the folder that holds your runs",
    ),
    case("explore_port_out_of_range", ["explore", "{BAD}", "--port", "99999"], "--port 99999: expected 1..65535"),
    case(
        "explore_live_system_unknown",
        ["explore", "{BAD}", "--live-system", "blocklist>fak"],
        "Unknown generator 'fak'. Did you mean 'fake'?",
    ),
    # run data of the wrong type: refused at the store, naming file, line and field ----------
    damaged("record_status_number", "report", "generations/rank-1.jsonl", "record_status_number.jsonl", "rank-1.jsonl line 1: not a record of this t2i-eval version (field 'status' should be one of ok, refused, error, found 5)"),
    damaged("record_status_unknown", "judge", "generations/rank-1.jsonl", "record_status_unknown.jsonl", "field 'status' should be one of ok, refused, error, found maybe"),
    damaged("record_seed_text", "sweep", "generations/rank-1.jsonl", "record_seed_text.jsonl", "rank-1.jsonl line 1: not a record of this t2i-eval version (field 'seed' should be an integer, found zero)"),
    damaged("record_record_id_number", "report", "generations/rank-1.jsonl", "record_record_id_number.jsonl", "rank-1.jsonl line 1: not a record of this t2i-eval version (field 'record_id' should be text, found 5)"),
    damaged("record_decisions_not_a_list", "judge", "generations/rank-1.jsonl", "record_decisions_not_a_list.jsonl", "field 'decisions' should be a list"),
    damaged("record_decision_refused_text", "sweep", "generations/rank-1.jsonl", "record_decision_refused_text.jsonl", "decisions[0]: field 'refused' should be true/false or null, found yes"),
    damaged("record_decision_stage_unknown", "report", "generations/rank-1.jsonl", "record_decision_stage_unknown.jsonl", "decisions[0]: field 'stage' should be one of prompt_guard, generator, image_guard"),
    damaged("record_image_path_number", "report", "generations/rank-1.jsonl", "record_image_path_number.jsonl", "field 'image_path' should be text or null, found 7"),
    damaged("record_seed_5001_digits", "report", "generations/rank-1.jsonl", "record_seed_5001_digits.jsonl", "rank-1.jsonl line 1: corrupt record (not JSON)"),
    damaged("record_nested_deep", "report", "generations/rank-1.jsonl", "{MADE:deep_record.jsonl}", "rank-1.jsonl line 1: corrupt record (nested too deeply)"),
    damaged("record_resume_status_number", "resume", "generations/rank-1.jsonl", "record_status_number.jsonl", "rank-1.jsonl line 1:"),
    damaged("generations_is_a_file", "report", "generations", "generations_is_a_file", "is a file where the records folder belongs"),
    damaged("generations_is_a_file_resume", "resume", "generations", "generations_is_a_file", "is a file where the records folder belongs"),
    damaged("verdict_flagged_text", "report", "verdicts/blank@2.jsonl", "verdict_flagged_text.jsonl", "blank@2.jsonl line 1: not a record of this t2i-eval version (field 'flagged' should be true/false or null, found yes)"),
    damaged("verdict_score_text", "report", "verdicts/blank@2.jsonl", "verdict_score_text.jsonl", "field 'score' should be a number or null, found high"),
    damaged("verdict_raw_not_object", "report", "verdicts/blank@2.jsonl", "verdict_raw_not_object.jsonl", "field 'raw' should be an object"),
    damaged("verdict_is_a_folder", "report", "verdicts/blank@2.jsonl", "verdict_is_a_folder", "blank@2.jsonl: is a folder where a file belongs"),
    damaged("manifest_is_a_folder", "report", "manifest.json", "manifest_is_a_folder", "manifest.json: is a folder where a file belongs"),
    damaged("manifest_is_a_folder_resume", "resume", "manifest.json", "manifest_is_a_folder", "manifest.json: is a folder where a file belongs"),
    damaged("manifest_status_number", "report", "manifest.json", "manifest_status_number.json", "manifest.json: field 'status' should be str, found 5"),
    damaged("manifest_suite_digest_number", "resume", "manifest.json", "manifest_suite_digest_number.json", "field 'suite.digest' should be str, found 7"),
    damaged("manifest_counts_list", "sweep", "manifest.json", "manifest_counts_list.json", "field 'counts' should be dict, found [1]"),
    damaged("manifest_argv_text", "judge", "manifest.json", "manifest_argv_text.json", "field 'argv' should be list"),
    damaged("manifest_pid_text", "report", "manifest.json", "manifest_pid_text.json", "field 'pid' should be int or null"),
    damaged("manifest_nested_deep", "report", "manifest.json", "{MADE:deep.json}", "manifest.json: corrupt manifest (not JSON)"),
    damaged("prompts_label_unknown", "judge", "prompts.jsonl", "prompts_label_unknown.jsonl", "prompts.jsonl line 1: not a record of this t2i-eval version (field 'label' should be one of benign, unsafe"),
    damaged("prompts_meta_not_object", "report", "prompts.jsonl", "prompts_meta_not_object.jsonl", "field 'meta' should be an object"),
    damaged("prompts_is_a_folder", "judge", "prompts.jsonl", "prompts_is_a_folder", "prompts.jsonl: is a folder where a file belongs"),
]

#: Cases that once exhausted memory or time: they must be refused in a bounded amount of memory.
MEMORY_CASES = {
    "seeds_two_billion",
    "system_fake_size_huge",
    "system_alias_bomb",
    "system_yaml_nested_deep",
    "system_name_megabyte",
    "suite_json_nested_deep",
    "suite_id_5001_digits",
}
MEMORY_BOUND_MB = 300
"""Peak RSS growth a memory case may cause (the hostile inputs once took gigabytes)."""


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
    subs = {"{BAD}": str(BAD), "{OUT}": str(tmp_path / "out"), "{MADE:long_name}": "x" * 1_000_000}
    for name in MADE:
        key = f"{{MADE:{name}}}"
        if any(key in a for a in argv):
            subs[key] = str(_made(name, tmp_path))
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


def _made(name: str, tmp_path: Path) -> Path:
    path = tmp_path / "made" / name
    path.parent.mkdir(exist_ok=True)
    MADE[name](path)
    return path


def _damage(target: Path, corpus: str, tmp_path: Path) -> None:
    """Put corpus entry `corpus` (file, folder or {MADE:name}) where `target` stood."""
    if corpus.startswith("{MADE:"):
        source = _made(corpus[len("{MADE:") : -1], tmp_path)
    else:
        source = BAD / corpus
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy(source, target)


def test_corpus_is_large_and_every_file_is_used():
    assert len(CASES) >= 150
    assert {c.id for c in CASES} >= MEMORY_CASES
    this_file = Path(__file__).read_text()
    assert not [p.name for p in BAD.iterdir() if p.name not in this_file and p.suffix != ".md"]


@pytest.mark.parametrize("argv,message,damage", CASES)
def test_bad_input_one_line_exit_2_nothing_lost(
    argv, message, damage, finished_run, tmp_path, capsys, request
):
    run = None
    new_run = argv[0] == "run" and "{RUN}" not in argv
    if "{RUN}" in " ".join(argv):
        run = tmp_path / "run"
        shutil.copytree(finished_run, run)
        for rel, corpus_file in damage.items():
            _damage(run / rel, corpus_file, tmp_path)
    argv = _expand(argv, tmp_path, run)
    before = _snapshot(run) if run else {}
    user_dir = tmp_path / "mine"
    user_before = _snapshot(user_dir) if user_dir.exists() else {}
    capsys.readouterr()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    code = main(argv)

    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    err = capsys.readouterr().err
    assert code == 2, err[:2000]
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2i-eval: error: "), err[:2000]
    assert message in lines[0]
    assert len(lines[0]) <= 700, "an error line stays readable whatever the input echoed"
    if request.node.callspec.id in MEMORY_CASES:
        assert grew_mb < MEMORY_BOUND_MB, f"peak memory grew by {grew_mb:.0f} MB"
    if run is not None:
        assert not _kept(before, _snapshot(run))
    if user_dir.exists():  # not even a lock file lands in a folder that is not a run
        assert sorted(p.name for p in user_dir.iterdir()) == sorted(user_before)
        assert not _kept(user_before, _snapshot(user_dir))
    if new_run:
        assert not (tmp_path / "out").exists()  # rejected before any run directory was made


def test_a_run_that_failed_to_start_never_blocks_the_corrected_command(tmp_path, capsys):
    """Option values are checked before anything is written (the corpus above); what can only
    fail while loading (here a word list that does not exist) leaves a `failed` run with no
    record, and the corrected command with the same --out takes that folder over."""
    out = tmp_path / "out"
    broken = tmp_path / "broken.yaml"
    broken.write_text("prompt_guards: [{name: blocklist, path: /no/such/list.yaml}]\ngenerator: fake\n")
    assert main(["run", "--system", str(broken), "--limit", "2", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "word list /no/such/list.yaml not found" in err[0]
    m = RunStore(out).read_manifest()
    assert m["status"] == "failed" and "not found" in m["error"]
    assert not RunStore(out).has_records()

    fixed = tmp_path / "fixed.yaml"
    fixed.write_text("prompt_guards: [blocklist]\ngenerator: fake\n")
    assert main(["run", "--system", str(fixed), "--limit", "2", "--out", str(out), "-q"]) == 0
    m = RunStore(out).read_manifest()
    assert m["status"] == "complete" and m["counts"] == {"ok": 2}
    assert m["system"]["prompt_guards"] == [{"name": "blocklist"}]

    # a run that did generate something is never taken over by another configuration
    other = tmp_path / "other.yaml"
    other.write_text("prompt_guards: [profanity]\ngenerator: fake\n")
    assert main(["run", "--system", str(other), "--limit", "2", "--out", str(out), "-q"]) == 2
    assert "holds a run of another suite or system" in capsys.readouterr().err


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
    derived = ("report/", "manifest", "index.sqlite")  # the explorer's index is derived data
    records = {k: v for k, v in before.items() if not k.startswith(derived)}
    assert not _kept(records, _snapshot(run))  # the judge pass rewrites report, manifest, index
    assert (
        RunStore(run).read_manifest()["history"] == json.loads(before["manifest.json"])["history"]
    )

    # the fix the warning names works: delete the file, rerun the run command, judge again
    (run / damaged.image_path).unlink()
    assert main([*BASE_RUN, "--out", str(run)]) == 0
    assert "(1 generated, 5 already done)" in capsys.readouterr().out
    assert store.read_verdicts("blank@2")[damaged.record_id].flagged is False
