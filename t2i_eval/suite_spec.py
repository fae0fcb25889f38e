"""Suite specs: any public prompt set as a suite, by mapping its columns, labels and categories.

A spec is a YAML file of values (STYLE.md section 5); a *recipe* is a spec shipped in
`prompts/sources/` for a known public set. This module turns rows (dicts, as the readers in
`suites.py` yield them) into prompts under a spec, and records where they came from
(`Suite.provenance`: spec digest, source sha256, license, rows dropped and why).

    name: my-set                   # required
    version: 1                     # bump when the mapping changes results
    source: data/prompts.csv       # relative to the spec file, or hf://owner/name[:config][#split]
    sha256: 3f...                  # optional pin of the source file
    license: CC-BY-4.0
    columns: {prompt: text, category: topic, id: case_number}
    category_split: ","            # a multi-valued category cell: the first value that maps wins
    label: unsafe                  # benign | unsafe | {column, map} | {column, unsafe_at_least, benign_at_most}
    taxonomy: i2p                  # a mapping in prompts/taxonomies.yaml, or a file path
    pairs: {column: image, pattern: '^(?P<role>[us])_idx_(?P<pair>.+)$', benign: s, unsafe: u}
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, shorten
from .paths import data_dir, load_yaml
from .types import CATEGORIES, LABELS, Prompt, content_id

#: Accepted label spellings (after `fold_text`).
LABEL_ALIASES: dict[str, str] = {
    "benign": "benign",
    "safe": "benign",
    "unsafe": "unsafe",
    "harmful": "unsafe",
}
#: A taxonomy maps a foreign name to one of OVERT's categories or to this.
OTHER = "other"

SPEC_KEYS = {
    "name",
    "version",
    "source",
    "sha256",
    "license",
    "columns",
    "category_split",
    "label",
    "taxonomy",
    "pairs",
    "format",
}
#: Keys for people and `t2i-eval list`; they never change results (not in the digest).
DOC_KEYS = {"about", "labels_mean", "homepage", "notes"}
COLUMN_KEYS = {"prompt", "category", "id"}
#: `format: overt` hands the file to the OVERT reader (its columns are fixed and known).
FORMATS = ("columns", "overt")


def fold_text(raw: str) -> str:
    """NFKC-normalised, lower-case, with format and control characters (zero-width spaces,
    bidi marks, ESC) removed: `violence\\u200b` and full-width `ＶＩＯＬＥＮＣＥ` must not become categories of
    their own, and a label must not hide behind an invisible character."""
    text = unicodedata.normalize("NFKC", raw)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cf", "Cc"))
    return text.strip().lower()


#: Source category spellings -> our names. Keys are already lower-case with underscores.
CATEGORY_ALIASES: dict[str, str] = {
    "unethical": "unethical_unsafe_action",
    "unethical_unsafe_actions": "unethical_unsafe_action",
    "unsafe_action": "unethical_unsafe_action",
    "sexual": "sexual_content",
    "sex": "sexual_content",
    "selfharm": "self_harm",
    "copyright": "copyright_violations",
    "copyright_violation": "copyright_violations",
    "illegal": "illegal_activities",
    "illegal_activity": "illegal_activities",
    "malicious_use_illegal_activities": "illegal_activities",
    "harmful_discrimination": "discrimination",
    "privacy_individuals": "privacy_individual",
    "privacy_public_figures": "privacy_public",
}


def normalize_category(raw: str) -> str:
    """`Unethical`, `unethical-unsafe-action` and `unethical_unsafe_action` are one category
    (used when no taxonomy is named: the file already speaks OVERT's names, or its own)."""
    key = re.sub(r"[\s\-/]+", "_", fold_text(raw))
    return CATEGORY_ALIASES.get(key, key)


def _name_key(raw: str) -> str:
    """`Self-Harm`, `self_harm` and `self harm` are one name."""
    return re.sub(r"[\s_\-]+", " ", fold_text(raw)).strip()


# ---------------------------------------------------------------------------------------------
# Taxonomies


@dataclass(frozen=True)
class Taxonomy:
    """Foreign category names -> OVERT's nine categories or `other`."""

    name: str
    mapping: dict[str, str]
    """name key (see `_name_key`) -> our category."""
    strip_prefix: str = ""
    """Removed before lookup (XSTest's `contrast_` types)."""
    split: str = ""
    """Only the part before this is looked up (`Primary--Subcategory`, `sexual/minors`)."""

    def map(self, raw: str) -> str | None:
        """Our category for a foreign name, or None when the taxonomy does not know it."""
        text = fold_text(raw)
        if self.strip_prefix and text.startswith(self.strip_prefix):
            text = text[len(self.strip_prefix) :]
        if self.split:
            text = text.split(self.split, 1)[0]
        return self.mapping.get(_name_key(text))


def taxonomies_file() -> Path:
    """The shipped taxonomies (prompts/taxonomies.yaml)."""
    return data_dir("prompts") / "taxonomies.yaml"


def load_taxonomy(ref: str, base: Path | None = None) -> Taxonomy:
    """A taxonomy by name (prompts/taxonomies.yaml) or from a YAML file path.

    A file holds one taxonomy: keys `categories` (name -> category), optional `strip_prefix`
    and `split`; the shipped file holds several under `taxonomies:`."""
    path = Path(ref) if base is None or Path(ref).is_absolute() else base / ref
    if ref.endswith((".yaml", ".yml")):
        return _taxonomy(path.stem, load_yaml(path, "taxonomy"), str(path))
    shipped = load_yaml(taxonomies_file(), "taxonomies") or {}
    table = shipped.get("taxonomies", {}) if isinstance(shipped, dict) else {}
    if ref not in table:
        from .errors import did_you_mean

        raise UserError(
            f"unknown taxonomy '{shorten(ref, 40)}'.{did_you_mean(ref, list(table))} "
            f"Available: {', '.join(table)}; or a YAML file path"
        )
    return _taxonomy(ref, table[ref], f"{taxonomies_file()} taxonomy '{ref}'")


def taxonomy_names() -> list[str]:
    """Names of the shipped taxonomies, for `t2i-eval list` and errors."""
    shipped = load_yaml(taxonomies_file(), "taxonomies") or {}
    return list(shipped.get("taxonomies", {}))


def _taxonomy(name: str, data: Any, where: str) -> Taxonomy:
    allowed = {"categories", "strip_prefix", "split", "about", "version"}
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
        raise UserError(f"{where}: expected a mapping with 'categories' (foreign name -> category)")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    mapping: dict[str, str] = {}
    for raw, ours in data["categories"].items():
        if not isinstance(raw, str) or ours not in (*CATEGORIES, OTHER):
            raise UserError(
                f"{where}: '{shorten(str(raw), 40)}' maps to '{shorten(str(ours), 40)}'; map each "
                f"name to one of {', '.join(CATEGORIES)} or {OTHER}"
            )
        mapping[_name_key(raw)] = ours
    for key in ("strip_prefix", "split"):
        if not isinstance(data.get(key, ""), str):
            raise UserError(f"{where}: '{key}' must be text")
    return Taxonomy(name, mapping, fold_text(data.get("strip_prefix", "")), data.get("split", ""))


# ---------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class SuiteSpec:
    """A validated suite spec; see the module docstring for the keys."""

    name: str
    values: dict[str, Any]
    """Every key that changes results, as written (recorded in the manifest)."""
    where: str
    """The spec file or recipe, for messages."""
    base: Path
    """Folder that relative `source` and `taxonomy` paths start from."""
    doc: dict[str, Any] = field(default_factory=dict)
    """`about`, `labels_mean`, `homepage`, `notes`: for people, not results."""

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.values, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def source(self) -> str:
        return str(self.values.get("source", ""))


def recipes() -> dict[str, Path]:
    """Shipped recipe name -> file (`prompts/sources/*.yaml`). The name is the file's own
    `name:` (what users type in `--suite NAME:PATH`), not its file name: a recipe's file is not
    named like the dataset it reads, so no tracked file looks like the data itself."""
    folder = data_dir("prompts") / "sources"
    out: dict[str, Path] = {}
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
        data = load_yaml(path, "recipe")
        name = str(data.get("name", path.stem)) if isinstance(data, dict) else path.stem
        if name in out:
            raise UserError(f"recipes {out[name]} and {path} both say name: {name}; rename one")
        out[name] = path
    return out


def load_spec(path: Path, what: str = "suite spec") -> SuiteSpec:
    """Read and validate a spec file; every problem is a one-line UserError."""
    data = load_yaml(path, what)
    return parse_spec(data, f"{what} {path}", path.parent)


def parse_spec(data: Any, where: str, base: Path) -> SuiteSpec:
    """Validate a spec's values (already loaded) with one-line errors; `base` resolves relative paths."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with keys {', '.join(sorted(SPEC_KEYS))}")
    unknown = sorted(str(k) for k in set(data) - SPEC_KEYS - DOC_KEYS)
    if unknown:
        from .errors import did_you_mean

        raise UserError(
            f"{where}: unknown key(s) {', '.join(unknown)}.{did_you_mean(unknown[0], sorted(SPEC_KEYS))} "
            f"(allowed: {', '.join(sorted(SPEC_KEYS | DOC_KEYS))})"
        )
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,79}", name):
        raise UserError(f"{where}: 'name' is required: 1 to 80 letters, digits, '_', '.', '-'")
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, (int, str)):
        raise UserError(f"{where}: 'version' must be a number or text")
    fmt = data.get("format", "columns")
    if fmt not in FORMATS:
        raise UserError(f"{where}: 'format' must be one of {', '.join(FORMATS)}")
    for key in ("source", "license", "sha256", "category_split", "taxonomy"):
        if key in data and not isinstance(data[key], str):
            hint = " (quote it: YAML reads digits as a number)" if key == "sha256" else ""
            raise UserError(
                f"{where}: '{key}' must be text, found {type(data[key]).__name__}{hint}"
            )
    sha = data.get("sha256")
    if sha is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        raise UserError(f"{where}: 'sha256' must be 64 hex digits (`sha256sum FILE` prints it)")
    if fmt == "columns":
        _check_columns(data.get("columns"), where)
        if "label" not in data and "pairs" not in data:
            raise UserError(
                f"{where}: missing 'label': benign, unsafe, {{column, map}} or "
                "{column, unsafe_at_least, benign_at_most} (or 'pairs', whose roles give labels)"
            )
        if "label" in data:
            _check_label(data["label"], where)
        if "pairs" in data:
            _check_pairs(data["pairs"], where)
        if "taxonomy" in data:
            load_taxonomy(data["taxonomy"], base)  # fails now, not on the first row
    values = {k: data[k] for k in sorted(SPEC_KEYS) if k in data}
    values["version"] = version
    doc = {k: data[k] for k in DOC_KEYS if k in data}
    return SuiteSpec(name, values, where, base, doc)


def _check_columns(columns: Any, where: str) -> None:
    if not isinstance(columns, dict) or "prompt" not in columns:
        raise UserError(
            f"{where}: 'columns' must map prompt (and optionally category, id) to column names, "
            "e.g. {prompt: text, category: topic}"
        )
    unknown = sorted(str(k) for k in set(columns) - COLUMN_KEYS)
    if unknown:
        raise UserError(f"{where}: columns: unknown key(s) {', '.join(unknown)} (allowed: prompt, category, id)")
    for key, value in columns.items():
        if not isinstance(value, str):
            raise UserError(f"{where}: columns.{key} must be a column name (text)")


def _check_label(label: Any, where: str) -> None:
    if isinstance(label, str):
        if label not in LABELS:
            raise UserError(f"{where}: label '{shorten(label, 20)}' must be benign or unsafe (every row)")
        return
    if not isinstance(label, dict) or not isinstance(label.get("column"), str):
        raise UserError(f"{where}: 'label' must be benign, unsafe or a mapping with a 'column'")
    keys = set(label) - {"column"}
    if keys == {"map"}:
        mapping = label["map"]
        if not isinstance(mapping, dict) or not mapping:
            raise UserError(f"{where}: label.map must map cell values to benign or unsafe")
        bad = [str(v) for v in mapping.values() if v not in LABELS]
        if bad:
            raise UserError(f"{where}: label.map values must be benign or unsafe, found '{shorten(bad[0], 20)}'")
    elif keys == {"unsafe_at_least", "benign_at_most"}:
        lo, hi = label["benign_at_most"], label["unsafe_at_least"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
        if not numbers or lo >= hi:
            raise UserError(
                f"{where}: a graded label needs numbers benign_at_most < unsafe_at_least "
                "(rows in between are dropped)"
            )
    elif keys:
        raise UserError(
            f"{where}: label: expected {{column, map}} or {{column, unsafe_at_least, "
            f"benign_at_most}}, found keys {', '.join(sorted(str(k) for k in label))}"
        )


def _check_pairs(pairs: Any, where: str) -> None:
    need = {"column", "pattern", "benign", "unsafe"}
    if not isinstance(pairs, dict) or set(pairs) != need:
        raise UserError(f"{where}: 'pairs' needs exactly the keys {', '.join(sorted(need))}")
    if not all(isinstance(pairs[k], str) for k in need):
        raise UserError(f"{where}: pairs: every value must be text")
    try:
        pattern = re.compile(pairs["pattern"])
    except re.error as e:
        raise UserError(f"{where}: pairs.pattern is not a regular expression ({e})") from None
    if not {"role", "pair"} <= set(pattern.groupindex):
        raise UserError(f"{where}: pairs.pattern needs named groups (?P<role>...) and (?P<pair>...)")


# ---------------------------------------------------------------------------------------------
# Rows -> prompts


@dataclass
class _Drops:
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, why: str) -> None:
        self.counts[why] += 1


def build_prompts(
    spec: SuiteSpec, rows: Iterable[tuple[str, dict[str, Any]]]
) -> tuple[list[Prompt], dict[str, Any]]:
    """Prompts from rows under `spec`, and the provenance counts (rows read, dropped by why)."""
    v = spec.values
    cols = v["columns"]
    taxonomy = load_taxonomy(v["taxonomy"], spec.base) if "taxonomy" in v else None
    drops = _Drops()
    kept: list[tuple[str, dict[str, Any], str, str, str, dict[str, Any]]] = []
    pairs = v.get("pairs")
    pattern = re.compile(pairs["pattern"]) if pairs else None
    n = 0
    for where, row in rows:
        n += 1
        text = _cell_text(where, row, cols["prompt"])
        if text is None:
            drops.add("empty prompt")
            continue
        category, meta = _category(where, row, cols.get("category"), v.get("category_split"), taxonomy)
        if category is None:
            drops.add("unmapped category")
            continue
        role = None
        if pattern is not None:
            cell = str(row.get(pairs["column"], "") or "")
            m = pattern.match(cell)
            role = m.group("role") if m else None
            if m is None or role not in (pairs["benign"], pairs["unsafe"]):
                drops.add("no twin role")
                continue
            meta["pair_name"] = m.group("pair")
            meta["pair_role"] = role
        label = _label(where, row, v.get("label"), role, pairs)
        if label is None:
            drops.add("graded band")
            continue
        used = {cols["prompt"], cols.get("id"), cols.get("category")}
        extra = {k: val for k, val in row.items() if k not in used and k != ""}
        kept.append((where, row, text, category, label, {**extra, **meta}))
    pair_ids = _pair_ids(spec.name, kept) if pattern is not None else {}
    prompts: list[Prompt] = []
    seen: dict[str, Prompt] = {}
    for i, (where, row, text, category, label, meta) in enumerate(kept):
        pair_id = pair_ids.get(i)
        if pattern is not None and pair_id is None:
            drops.add("unpaired twin")
            continue
        given = source_id(where, row.get(cols["id"])) if "id" in cols else None
        pid = given or content_id(text, category, label, *([pair_id] if pair_id else []))
        p = Prompt(pid, text, category, label, pair_id=pair_id, source=where, meta=meta)  # type: ignore[arg-type]
        prev = seen.get(pid)
        if prev is not None:
            if (prev.text, prev.category, prev.label) == (text, category, label) and not given:
                drops.add("duplicate")
                continue
            raise UserError(f"{where}: duplicate id '{shorten(pid, 40)}' (first at {prev.source})")
        seen[pid] = p
        prompts.append(p)
    return prompts, {"rows": n, "dropped": dict(sorted(drops.counts.items()))}


def _cell_text(where: str, row: dict[str, Any], column: str) -> str | None:
    if column not in row:
        raise UserError(
            f"{where}: no column '{shorten(column, 40)}' (have: {shorten(', '.join(map(str, row)), 200)}); "
            "fix columns.prompt in the spec"
        )
    value = row[column]
    if isinstance(value, (list, dict, bool)):
        raise UserError(f"{where}: '{shorten(column, 40)}' must be text, found {type(value).__name__}")
    text = "" if value is None else str(value).strip()
    return text or None


def _category(
    where: str,
    row: dict[str, Any],
    column: str | None,
    split: str | None,
    taxonomy: Taxonomy | None,
) -> tuple[str | None, dict[str, Any]]:
    """(our category or None if nothing maps, metadata with the original names)."""
    if column is None:
        return OTHER if taxonomy is None else None, {}
    if column not in row:
        raise UserError(f"{where}: no column '{shorten(column, 40)}'; fix columns.category in the spec")
    cell = row[column]
    if isinstance(cell, dict):  # {"Primary--Sub": [reasons]}: the keys are the categories
        names = [str(k) for k in cell]
    elif isinstance(cell, list):
        names = [str(x) for x in cell]
    else:
        text = "" if cell is None else str(cell)
        names = [s for s in (text.split(split) if split else [text])]
    names = [s.strip() for s in names if s and s.strip()]
    meta: dict[str, Any] = {"categories_original": names} if len(names) > 1 else {}
    for raw in names:
        ours = taxonomy.map(raw) if taxonomy is not None else normalize_category(raw) or None
        if ours:
            meta["category_original"] = raw
            return ours, meta
    return None, meta


def _label(
    where: str, row: dict[str, Any], rule: Any, role: str | None, pairs: dict[str, str] | None
) -> str | None:
    """benign/unsafe for a row, or None for a graded row in the dropped middle band."""
    if rule is None:  # labels from twin roles
        assert pairs is not None and role is not None
        return "benign" if role == pairs["benign"] else "unsafe"
    if isinstance(rule, str):
        return rule
    column = rule["column"]
    if column not in row:
        raise UserError(f"{where}: no column '{shorten(column, 40)}'; fix label.column in the spec")
    cell = row[column]
    if "map" in rule:
        folded = {fold_text(str(k)): val for k, val in rule["map"].items()}
        label = folded.get(fold_text(str(cell)))
        if label is None:
            raise UserError(
                f"{where}: label cell '{shorten(str(cell), 40)}' is not in label.map "
                f"(have: {', '.join(map(str, rule['map']))})"
            )
        return label
    try:
        score = float(cell)
    except (TypeError, ValueError):
        raise UserError(
            f"{where}: graded label column '{shorten(column, 40)}' holds '{shorten(str(cell), 40)}', "
            "not a number"
        ) from None
    if score >= rule["unsafe_at_least"]:
        return "unsafe"
    if score <= rule["benign_at_most"]:
        return "benign"
    return None


#: Longest id a suite may give a prompt; ids are keys, not text.
MAX_ID = 200


def source_id(where: str, value: Any, key: str = "id") -> str | None:
    """A source's id cell as text (None when absent). Numbers are fine; lists, objects,
    booleans and very long values are not (an int is measured before `str`, which refuses
    more than 4,300 digits)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: '{key}' must be text or a number, found {type(value).__name__}")
    too_long = abs(value) >= 10**MAX_ID if isinstance(value, int) else len(str(value)) > MAX_ID
    if too_long:
        raise UserError(f"{where}: '{key}' is longer than {MAX_ID} characters; ids are short keys")
    return str(value).strip() or None


def _pair_ids(suite: str, kept: list[tuple[Any, ...]]) -> dict[int, str]:
    """Twin pairs: each unsafe row pairs with the next unpaired benign row of the same name,
    in order of occurrence (names repeat: `u, u, s, s` is two pairs, not one)."""
    waiting: dict[str, deque[int]] = defaultdict(deque)
    count: Counter[str] = Counter()
    out: dict[int, str] = {}
    for i, (*_, label, meta) in enumerate(kept):
        name = meta["pair_name"]
        if label == "unsafe":
            waiting[name].append(i)
        elif waiting[name]:
            u = waiting[name].popleft()
            count[name] += 1
            pid = f"{suite}:{name}#{count[name]}" if count[name] > 1 else f"{suite}:{name}"
            out[u] = out[i] = pid
    return out


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (sources can be large)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
