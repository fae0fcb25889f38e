"""Every prompt source lands here and becomes a `Suite`.

Sources: a built-in name (`core`), a JSONL/CSV/JSON path (our columns, or OVERT's files as
published), or `hf://owner/name[:config][#split]` through `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import MissingExtra, UserError, did_you_mean, shorten
from .paths import data_dir, load_yaml
from .suite_spec import (
    LABEL_ALIASES,
    SuiteSpec,
    build_prompts,
    file_sha256,
    fold_text,
    load_spec,
    normalize_category,
    recipes,
    source_id,
)
from .types import Prompt, Suite, content_id

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "text", "image_prompt")
OVERT_PAIR_FIELDS = ("benign_image_prompt", "unsafe_image_prompt")
_OVERT_FILE_SUFFIX = re.compile(r"_(mini|full|unsafe)$")


def builtin_suites() -> dict[str, Path]:
    """Built-in suite name -> file, read from the `prompts/` data folder."""
    return {p.stem: p for p in sorted(data_dir("prompts").glob("*.jsonl"))}


def load_suite(ref: str) -> Suite:
    """Load a suite from a built-in name, a file path, a suite spec (`*.yaml`), a recipe
    (`NAME` for its own source, `NAME:PATH` for a local copy) or an `hf://` reference."""
    if ref.startswith("hf://"):
        return _load_hf(ref)
    path = Path(ref)
    recipe, colon, local = ref.partition(":")
    if not path.exists():
        builtins = builtin_suites()
        if ref in builtins:
            return _load_builtin(ref, builtins[ref])
        shipped = recipes()
        if ref in shipped or (colon and recipe in shipped):
            return _load_spec(load_spec(shipped[recipe], f"recipe '{recipe}'"), local or None)
        hint = did_you_mean(recipe if colon else ref, [*builtins, *shipped])
        raise UserError(
            f"suite '{shorten(ref, 120)}' is neither a built-in suite, a recipe nor an existing "
            f"file.{hint} Built-in: {', '.join(builtins) or 'none'}; recipes: "
            f"{', '.join(shipped) or 'none'} (NAME or NAME:PATH); files: .jsonl, .csv, .json, "
            "a suite spec .yaml; or hf://owner/name."
        )
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return _load_spec(load_spec(path))
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a .jsonl, .csv or .json file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    else:
        raise UserError(f"{path}: unknown suite format '{suffix}' (expected .jsonl, .csv or .json)")
    suite = _build_suite(path.stem, rows, source=str(path))
    card = path.with_suffix(".card.json")
    if card.is_file():  # written by `make-suite` beside its suite: the run's manifest keeps it
        provenance = {"card": _suite_card(card, suite)}
        suite = Suite(suite.name, suite.prompts, suite.version, suite.source, provenance)
    return suite


def _suite_card(path: Path, suite: Suite) -> dict[str, Any]:
    """The `make-suite` card beside a suite file, or a note that it describes other prompts
    (the suite was edited after it was built: the card's counts no longer hold)."""
    card = _json_value(_read_text(path), str(path))
    if not isinstance(card, dict):
        raise UserError(f"{path}: expected a JSON object (a make-suite card)")
    made = card.get("suite")
    recorded = made.get("digest") if isinstance(made, dict) else None
    if recorded != suite.digest:
        log.warning("%s describes other prompts (digest %s, suite %s)", path, recorded, suite.digest)
        return {"file": str(path), "stale": True, "recorded_digest": recorded}
    return {"file": str(path), **card}


def _load_builtin(name: str, path: Path) -> Suite:
    rows = _jsonl_rows(path)
    suite = _build_suite(name, rows, source=f"builtin:{name}")
    version = ""
    card = path.with_suffix(".yaml")
    if card.exists():
        version = str((load_yaml(card, "suite card") or {}).get("version", ""))
    return Suite(name=suite.name, prompts=suite.prompts, version=version, source=suite.source)


def _load_spec(spec: SuiteSpec, local: str | None = None) -> Suite:
    """A suite under a spec or recipe. `local` replaces the spec's source (`NAME:PATH`)."""
    source = local or spec.source
    if not source:
        where = spec.doc.get("homepage", "its homepage (t2i-eval list)")
        raise UserError(
            f"{spec.where}: no source this tool can fetch; download it from {where} and pass "
            f"--suite NAME:PATH (e.g. --suite {spec.name}:data.csv), or give the spec a 'source'"
        )
    provenance: dict[str, Any] = {
        "spec": spec.where,
        "spec_digest": spec.digest,
        "mapping": spec.values,
        "license": spec.values.get("license"),
    }
    if source.startswith("hf://"):
        rows, _ = _hf_rows(source)
        shown = source
        provenance["source"] = source
    else:
        path = Path(source) if local or Path(source).is_absolute() else spec.base / source
        if not path.is_file():
            hint = "" if local else f" (relative to {spec.base})"
            raise UserError(
                f"{spec.where}: source {path}{hint} is not a file. Download the data set (see "
                "`t2i-eval list`) and pass --suite NAME:PATH, or fix 'source'"
            )
        sha = file_sha256(path)
        pinned = spec.values.get("sha256")
        if pinned and pinned.lower() != sha:
            raise UserError(
                f"{spec.where}: {path} has sha256 {sha[:12]}..., the spec pins {pinned[:12]}...; "
                "the file changed: check it, then update sha256 (and bump version)"
            )
        provenance.update(source=str(path), source_sha256=sha)
        if spec.values.get("format") == "overt":
            suite = load_suite(str(path))
            return Suite(
                spec.name,
                suite.prompts,
                str(spec.values["version"]),
                str(path),
                {**provenance, "rows": len(suite.prompts), "dropped": {}},
            )
        rows, shown = _file_rows(path), str(path)
    prompts, counts = build_prompts(spec, rows)
    if not prompts:
        raise UserError(f"{spec.where}: no prompts left from {shown} ({counts})")
    dropped = counts["dropped"]
    if dropped:
        log.warning("%s: dropped %s", spec.where, ", ".join(f"{n} {why}" for why, n in dropped.items()))
    return Suite(spec.name, tuple(prompts), str(spec.values["version"]), shown, {**provenance, **counts})


def _file_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Plain rows of a CSV, JSONL or JSON-list file (no OVERT handling: the spec maps them)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        data = _json_value(_read_text(path), str(path))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a JSON list of objects")
        return ((f"{path} item {i}", r) for i, r in enumerate(data))
    raise UserError(f"{path}: unknown format '{suffix}' (expected .csv, .jsonl or .json)")


# ---------------------------------------------------------------------------------------------
# Readers: each yields (where, row_dict) with `where` naming file and line/row for errors.


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + bom  # offsets as the user's hex editor shows them, BOM included
        line = data[:at].count(b"\n") + 1
        raise UserError(
            f"{path} line {line}: not UTF-8 (byte 0x{data[at]:02x} at offset {at}). "
            "Re-save the file as UTF-8."
        ) from None


#: Deepest JSON nesting a suite may have: rows are flat; a deep file is hostile or broken.
_JSON_MAX_DEPTH = 32


def _json_value(text: str, where: str) -> Any:
    """Parse JSON text with one-line errors for every way it can fail: malformed, nested
    beyond reason (Python's parser would recurse until it crashes), or an integer too long
    for Python to convert (more than 4,300 digits)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if "\n" in text.strip():  # a whole file: the line is what the user needs
            raise UserError(f"{where} line {e.lineno}: malformed JSON ({e.msg})") from None
        raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply; rows are flat objects") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise UserError(f"{where}: unreadable JSON value ({shorten(str(e), 120)})") from None
    if _depth(value) > _JSON_MAX_DEPTH:
        raise UserError(
            f"{where}: JSON nested more than {_JSON_MAX_DEPTH} levels deep; rows are flat objects"
        )
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (the value may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if d > _JSON_MAX_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    # split on "\n" only: str.splitlines() also breaks at U+2028 etc., which JSON allows in strings
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path} line {n}"
        row = _json_value(line, where)
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, found {type(row).__name__}")
        yield where, row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    start = 1  # physical line where the record being read begins (for error messages)
    try:
        header = reader.fieldnames
        if not header:
            raise UserError(f"{path}: empty CSV (no header line)")
        # unnamed columns (an index column, trailing empty columns) may repeat: they are dropped
        repeated = sorted({h for h in header if h.strip() and header.count(h) > 1})
        if repeated:
            raise UserError(
                f"{path} line 1: column {', '.join(repr(shorten(h, 40)) for h in repeated)} "
                "appears more than once in the header; rename or remove the copy"
            )
        start = reader.line_num + 1
        for row in reader:
            where = f"{path} line {start}"
            start = reader.line_num + 1
            if None in row:
                raise UserError(
                    f"{where}: {len(header) + len(row[None])} fields but the header has "
                    f"{len(header)}; quote fields that contain commas"
                )
            if any(v is None for v in row.values()):
                have = sum(v is not None for v in row.values())
                raise UserError(f"{where}: {have} fields but the header has {len(header)}")
            yield where, row
    except csv.Error as e:
        if "field larger than field limit" in str(e):  # almost always a quote never closed
            raise UserError(
                f"{path} line {start}: a field longer than {csv.field_size_limit()} characters; "
                'check for a quote (") that is never closed'
            ) from None
        raise UserError(f"{path} line {start}: malformed CSV ({e})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A JSON list of rows, or an OVERT per-category file (category from the file name)."""
    data = _json_value(_read_text(path), str(path))
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of prompt objects")
    category = normalize_category(_OVERT_FILE_SUFFIX.sub("", path.stem))
    for i, entry in enumerate(data):
        where = f"{path} item {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object, found {type(entry).__name__}")
        yield from _overt_json_entry(where, entry, category)


def _overt_json_entry(
    where: str, entry: dict[str, Any], category: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """OVERT JSON entries hold lists whose key names vary by file; a plain row passes through."""
    meta = {"seed_prompt": entry.get("seed_prompt")} if "seed_prompt" in entry else {}
    pairs = entry.get("unsafe_prompts")
    if isinstance(pairs, list):
        for j, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                raise UserError(f"{where}.unsafe_prompts[{j}]: expected an object")
            benign = pair.get("benign_prompt", pair.get("benign_image_prompt"))
            unsafe = pair.get("unsafe_prompt", pair.get("unsafe_image_prompt"))
            yield (
                f"{where}.unsafe_prompts[{j}]",
                {
                    "benign_image_prompt": benign,
                    "unsafe_image_prompt": unsafe,
                    "category": category,
                    **meta,
                },
            )
        return
    for key in ("image_prompts", "prompts", "image_prompt"):
        value = entry.get(key)
        if isinstance(value, list):
            for j, text in enumerate(value):
                yield (
                    f"{where}.{key}[{j}]",
                    {
                        "prompt": text,
                        "category": category,
                        "label": "benign",
                        **meta,
                    },
                )
            return
    yield where, dict(entry)  # a plain row: it must name its own category like CSV/JSONL rows


def _load_hf(ref: str) -> Suite:
    rows, name = _hf_rows(ref)
    return _build_suite(name, rows, source=ref)


def _hf_rows(ref: str) -> tuple[Iterator[tuple[str, dict[str, Any]]], str]:
    """Rows of a hub data set (`hf://owner/name[:config][#split]`) and its short name."""
    spec = ref[len("hf://") :]
    spec, _, split = spec.partition("#")
    name, _, config = spec.partition(":")
    if not name:
        raise UserError(f"'{ref}': expected hf://owner/name[:config][#split]")
    try:
        import datasets
    except ImportError:
        raise MissingExtra("hf:// suites", "datasets", "hf") from None
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as e:  # the hub, a missing file, a bad config: all user-fixable here
        raise UserError(f"{ref}: could not load dataset ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split:
            if split not in loaded:
                raise UserError(f"{ref}: no split '{split}' (have: {', '.join(splits)})")
        elif len(splits) == 1:
            split = splits[0]
        elif "train" in loaded:
            split = "train"
        else:
            raise UserError(f"{ref}: several splits ({', '.join(splits)}); pick one with #split")
        loaded = loaded[split]
    rows = ((f"{ref} row {i}", dict(r)) for i, r in enumerate(loaded))
    return rows, name.rstrip("/").split("/")[-1]


# ---------------------------------------------------------------------------------------------
# Rows -> prompts


def _text(where: str, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if isinstance(value, (list, dict, bool)):
        raise UserError(f"{where}: '{key}' must be text, found {type(value).__name__}")
    if value is None or not str(value).strip():
        raise UserError(f"{where}: empty '{key}'; every prompt needs text")
    return str(value).strip()


def _row_prompts(where: str, row: dict[str, Any]) -> list[Prompt]:
    """One row -> one prompt, or two linked prompts for an OVERT-unsafe benign/unsafe pair."""
    cols = ", ".join(str(k) for k in row)
    raw_category = row.get("category")
    if raw_category is None:
        raise UserError(
            f"{where}: missing column 'category' (have: {cols}). Add the column with one of the "
            "9 OVERT categories or your own names."
        )
    if not isinstance(raw_category, str):
        raise UserError(f"{where}: 'category' must be text, found {type(raw_category).__name__}")
    if not raw_category.strip():
        raise UserError(f"{where}: empty 'category'")
    category = normalize_category(str(raw_category))
    if not category:
        raise UserError(f"{where}: 'category' holds only invisible characters")

    if all(k in row for k in OVERT_PAIR_FIELDS):
        benign = _text(where, row, OVERT_PAIR_FIELDS[0])
        unsafe = _text(where, row, OVERT_PAIR_FIELDS[1])
        pair_id = content_id(benign, unsafe, category)
        meta = {k: v for k, v in row.items() if k not in (*OVERT_PAIR_FIELDS, "category")}
        return [
            Prompt(
                content_id(benign, category, "benign"),
                benign,
                category,
                "benign",
                pair_id=pair_id,
                source=where,
                meta=meta,
            ),
            Prompt(
                content_id(unsafe, category, "unsafe"),
                unsafe,
                category,
                "unsafe",
                pair_id=pair_id,
                source=where,
                meta=meta,
            ),
        ]

    key = next((k for k in PROMPT_FIELDS if k in row), None)
    if key is None:
        raise UserError(
            f"{where}: missing column 'prompt' (have: {cols}). Name the text column 'prompt' "
            "(OVERT's 'image_prompt' also works)."
        )
    text = _text(where, row, key)
    raw_label = row.get("label")
    if raw_label is None:
        if "generation_type" in row and key == "image_prompt":
            raw_label = "benign"  # OVERT(-mini/-full) benign CSV as published
        else:
            raise UserError(
                f"{where}: missing column 'label' (have: {cols}). Add 'label' with benign or unsafe."
            )
    if isinstance(raw_label, (list, dict)):
        raise UserError(f"{where}: 'label' must be text, found {type(raw_label).__name__}")
    label = LABEL_ALIASES.get(fold_text(str(raw_label)))
    if label is None:
        raise UserError(
            f"{where}: unknown label '{shorten(str(raw_label), 40)}' (expected benign or unsafe)"
        )
    pid = source_id(where, row.get("id"), "id") or content_id(text, category, label)
    pair_id = source_id(where, row.get("pair_id"), "pair_id")
    known = {"id", key, "category", "label", "pair_id"}
    meta = {k: v for k, v in row.items() if k not in known}
    return [Prompt(pid, text, category, label, pair_id=pair_id, source=where, meta=meta)]


def _build_suite(name: str, rows: Iterable[tuple[str, dict[str, Any]]], source: str) -> Suite:
    prompts: list[Prompt] = []
    seen: dict[str, Prompt] = {}
    dropped = 0
    for where, row in rows:
        for p in _row_prompts(where, row):
            prev = seen.get(p.id)
            if prev is not None:
                same = (prev.text, prev.category, prev.label) == (p.text, p.category, p.label)
                if same and row.get("id") in (None, ""):
                    dropped += 1  # an exact repeat of content: one prompt, not two
                    continue
                raise UserError(
                    f"{p.source}: duplicate id '{p.id}' (first at {prev.source}); ids must be unique"
                )
            seen[p.id] = p
            prompts.append(p)
    if not prompts:
        raise UserError(f"{source}: empty suite (no prompts found)")
    if dropped:
        log.warning("%s: dropped %d exact duplicate prompt(s)", source, dropped)
    return Suite(name=name, prompts=tuple(prompts), source=source)
