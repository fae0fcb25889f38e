"""Owns every path in a run directory; append-only records, atomic file writes; reads runs.

Layout (STYLE.md section 6; README "Run directory" lists the same):
    manifest.json                    command, versions, suite digest, system spec, status, counts
    prompts.jsonl                    the exact prompts used
    generations/rank-<r>.jsonl       one Generation per line, append-only, one file per process
    images/<record_id>.png           every generated image (also the ones an image guard refused)
    verdicts/<judge>@<version>.jsonl one Verdict per line (+ <judge>@<version>.spec: its digest)
    report/                          report.md, summary.json, per_category.csv, per_prompt.csv,
                                     html/ (report --html)
    sweep/                           curve.csv, <guard>.png, proposed_thresholds.json
    triggers/                        loo.json, loo.csv, predictor.json
    .lock, .lock-rank<r>             one process per run directory and rank
A rewrite experiment writes a linked folder beside the run (`rewrite_dir`), laid out by
`RewriteFolder`: rewrites.jsonl, rewrite_plan.json, run/ (the linked run), report.md,
summary.json. Every path comes from here; `read_run` reads a run once for every reader
(report, explorer, triggers, rewrite).
No torch here: reports and the explorer read runs anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import MISSING, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypedDict, TypeVar, get_type_hints

import msgspec

from .errors import UserError
from .types import (
    OUTCOME_ROLES,
    REDECIDE_RAW,
    Generation,
    Outcome,
    Prompt,
    StageDecision,
    Verdict,
    outcomes,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Bump when the layout or record fields change incompatibly; readers refuse other versions.
STORE_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never a half-written file.

    `data` may come in chunks (any iterable of bytes), so a large file (a 100,000-row CSV) is
    written as it is made rather than held whole; the file appears only once all are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide reports from other readers
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                f.writelines(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets it; threads write too)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (`atomic_write_bytes`), pretty-printed for people."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a whole run is read and counted.

    Reading a 100,000-record run builds millions of small objects (decoded JSON, compact
    records) that hold no reference cycles; the collector, triggered by every few hundred
    allocations, walked them again and again: about 40% of `t2i-eval report`'s time at that
    size. Reference counting still frees everything as usual; only cycles wait for the
    collector, which runs again as soon as the block ends. Nested use keeps it paused."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    """Read records; a torn last line (a crash mid-write) is dropped with a warning."""
    for _, row in _numbered_jsonl(path):
        yield row


def _numbered_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs of a JSONL file, read line by line so a long run's file is
    never held whole; see `read_jsonl`.

    Lines are decoded `CHUNK` at a time as one JSON array: the decoder then shares the key
    strings of the chunk's records, which halves the time of decoding them one by one. A
    chunk that does not decode as exactly one object per line (a corrupt or torn line) is
    decoded line by line instead, so each line's error names it."""
    for start, lines in _chunks(path):
        yield from _decoded(path, start, lines)


def _chunks(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, lines) of a file, `CHUNK` lines at a time."""
    lines: list[bytes] = []
    start = 1
    for i, line in enumerate(_lines(path), 1):
        lines.append(line)
        if len(lines) == CHUNK:
            yield start, lines
            lines, start = [], i + 1
    if lines:
        yield start, lines


#: Lines decoded together (`_numbered_jsonl`); about as fast from 50 to 1,000.
CHUNK = 100


def _decoded(path: Path, start: int, lines: list[bytes]) -> Iterable[tuple[int, dict[str, Any]]]:
    """The records of `lines` (the first is line `start`), decoded together when they can be."""
    rows = _as_array(lines)
    if rows is None:
        yield from _one_by_one(path, start, lines)
    else:
        yield from enumerate(rows, start)


def _as_array(lines: list[bytes]) -> list[dict[str, Any]] | None:
    """`lines` decoded as one JSON array, or None unless that gives one object per line (a
    blank, corrupt or torn line, or a line holding two values)."""
    if not lines or not lines[-1].endswith(b"\n"):  # maybe torn: line by line says so
        return None
    try:
        rows = json.loads(b"[" + b",".join(lines) + b"]")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    one_each = len(rows) == len(lines) and all(type(r) is dict for r in rows)
    return rows if one_each else None


def _one_by_one(path: Path, start: int, lines: list[bytes]) -> Iterable[tuple[int, dict[str, Any]]]:
    """Records decoded line by line: blank lines skipped, a torn last line (no newline: the
    write never finished) dropped with a warning, any other bad line one clear error."""
    for i, line in enumerate(lines, start):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise UserError(f"{path} line {i}: corrupt record (nested too deeply)") from None
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError, or an int too long to read
            if not line.endswith(b"\n"):
                log.warning(
                    "%s: dropped a torn last line (%d bytes); it will be redone", path, len(line)
                )
                continue
            raise UserError(f"{path} line {i}: corrupt record (not JSON)") from None
        if not isinstance(row, dict):
            raise UserError(
                f"{path} line {i}: not a record of this t2i-eval version (a JSON "
                f"{type(row).__name__}, expected an object); start a new run directory"
            )
        yield i, row


def _lines(path: Path) -> Iterator[bytes]:
    """A run file's lines, each with its newline (a last line without one was torn)."""
    with _readable(path), open(path, "rb") as f:
        yield from f


def _read_bytes(path: Path) -> bytes:
    """A run file's bytes."""
    with _readable(path):
        return path.read_bytes()


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """A folder or unreadable file where a run file belongs is one clear error."""
    try:
        yield
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder where a file belongs; the run is damaged") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def located_records(path: Path, kind: type) -> Iterator[tuple[int, int, Any]]:
    """(byte offset, byte length without the newline, record) of each line of a JSONL file,
    for an index that finds a line again without reading the file (`run_index`): compact
    `Record`s as `RunStore.read_records` reads them, or `Prompt`s or `Verdict`s as
    `read_typed` does; refused as `read_run` refuses them."""
    if kind is Record:
        return CompactReader().located(path)
    return _located_typed(path, kind)


def parse_line(path: Path, line: int, d: dict[str, Any], parse: Callable[[dict[str, Any]], T]) -> T:
    """`parse(d)` of line `line` of `path`; a record of another layout, or a field of the
    wrong type, is one clear error naming the line and field."""
    try:
        return parse(d)
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(
            f"{path} line {line}: not a record of this t2i-eval version ({e}); "
            "start a new run directory"
        ) from None


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append lines and fsync. A torn tail left by a crash is cut off first so lines never merge."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in rows)
    if not payload:
        return
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                keep = f.read().rfind(b"\n") + 1
                f.seek(keep)
                if _complete_record(f.read()):  # only its newline was lost: keep it, as readers do
                    payload = b"\n" + payload
                else:
                    f.truncate(keep)
                f.seek(0, os.SEEK_END)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _complete_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


#: Manifest fields that readers use, with the JSON types they must have.
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "status": (str,),
    "error": (str, type(None)),
    "argv": (list,),
    "history": (list,),
    "counts": (dict,),
    "components": (list,),
    "batch_backoffs": (list,),
    "pid": (int, type(None)),
    "host": (str, type(None)),
    "planned": (int,),
    "seeds": (int,),
}
_MANIFEST_SECTIONS = {"suite": {"name": (str,), "digest": (str,)}, "system": {"digest": (str,)}}


def _check_manifest_fields(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose fields have the wrong types (hand-edited or damaged), naming
    the field, before any command trusts it."""
    from .errors import shorten

    def bad(name: str, value: Any, types: tuple[type, ...]) -> UserError:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        return UserError(
            f"{path}: field '{name}' should be {names}, found {shorten(value, 40)}; "
            "the manifest is damaged (restore it or start a new run directory)"
        )

    for key, types in _MANIFEST_TYPES.items():
        value = manifest.get(key)
        if key in manifest and (not isinstance(value, types) or isinstance(value, bool)):
            raise bad(key, value, types)
    for section, fields in _MANIFEST_SECTIONS.items():
        part = manifest[section]
        for key, types in fields.items():
            if key in part and not isinstance(part[key], types):
                raise bad(f"{section}.{key}", part[key], types)


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None where unknown.

    Stored beside the pid so a reader can tell the run's own process from a later process
    that happens to get the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = process_start(pid)
    return started is None or now is None or now == started


def writer_info() -> dict[str, Any]:
    """Who writes a running manifest: lets a later reader tell a live run from a killed one."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "pid_start": process_start(pid)}


def interrupted(manifest: dict[str, Any]) -> bool:
    """A manifest that says "running" although its process on this host is gone.

    A process killed outright (SIGKILL, out of memory, power loss) never writes "failed", so
    "running" alone does not mean running. A run on another host, or from a version that did
    not record its pid, cannot be checked from here and keeps its "running"."""
    pid = manifest.get("pid")
    if manifest.get("status") != "running" or not isinstance(pid, int):
        return False
    if manifest.get("host") != socket.gethostname():
        return False
    return not _pid_alive(pid, manifest.get("pid_start"))


class Decision(NamedTuple):
    """A `StageDecision` as `Record` keeps it: its numbers, not its words (no message, and of
    `raw` only what re-deciding it reads: `redecide_raw`)."""

    stage: str
    name: str
    refused: bool | None
    score: float | None
    threshold: float | None
    raw: dict[str, Any]
    """The raw values a report re-decides the decision from (`redecide_raw`); {} for most."""
    seconds: float | None
    unavailable: str | None


class Record(NamedTuple):
    """A `Generation` as readers that count a whole run keep it (`read_records`): every field
    the outcome, the tables, guard scores, timing and the gallery read, with the same names,
    and none of the texts (messages, errors). A tuple, with its repeated words interned: a
    100,000-record run fits in tens of MB."""

    record_id: str
    prompt_id: str
    seed: int
    status: str
    refused_by: str | None
    decisions: tuple[Decision, ...]
    image_path: str | None
    seconds: float | None
    rank: int

    @classmethod
    def from_checked(cls, d: dict[str, Any], decisions: tuple[Decision, ...]) -> Record:
        """From a record's fields already checked (`Generation.check`) and its decisions
        already made (`CompactReader`); a field left out takes `Generation`'s default."""
        refused_by = d.get("refused_by")
        return cls(
            d["record_id"],
            d["prompt_id"],
            d["seed"],
            sys.intern(d["status"]),
            None if refused_by is None else sys.intern(refused_by),
            decisions,
            d.get("image_path"),
            d.get("seconds"),
            d.get("rank", 0),
        )




class CompactReader:
    """Reads record lines into compact `Record`s, checked as `Generation.check` checks them, with
    one tuple for equal decisions.

    Each line is decoded and type-checked in one C pass (`msgspec`, against structs made from
    `types.Generation`'s own annotations: `line_decoder`), about three times faster than
    `json.loads` alone; a line it refuses (blank, torn, corrupt, or merely unusual such as a
    NaN) goes through the same reader as every other file (`json`, `Generation.check`), which
    accepts it or names what is wrong exactly as before.

    A run's decisions repeat: every guards-only record carries the same generator decision,
    a blocklist scores 0 or 1 against one threshold, a batch's items share its time, and every
    record with the same decisions repeats the same sequence. At 100,000 records the
    decisions were two thirds of the compact records' memory. Decisions that keep raw values
    (the safety checker's cosines) are never shared: they differ per image. Equal means `==`:
    a score of 1 and one of 1.0 are one decision. The tuples are read only, like every
    `Record`. Repeats are near each other (a batch's items are written together), so the
    tables are emptied every `LIMIT` distinct decisions: a guard with a new score for every
    prompt costs a bounded table, not one entry per decision."""

    #: Distinct decisions remembered before the tables start again.
    LIMIT = 4096

    def __init__(self, prompt_id: Callable[[str], str] = sys.intern) -> None:
        """`prompt_id`: a record's prompt id -> the one string kept for it, so a prompt's
        records and the prompt itself share one (default: the interned string)."""
        self._decisions: dict[tuple[Any, ...], Decision] = {}
        self._sequences: dict[tuple[int, ...], tuple[Decision, ...]] = {}
        self._prompt_id = prompt_id

    def read(self, path: Path) -> Iterator[Record]:
        """The records of one JSONL file, in file order."""
        return (r for _, _, r in self.located(path))

    def located(self, path: Path) -> Iterator[tuple[int, int, Record]]:
        """`read`, each record with its line's byte offset and length (`located_records`)."""
        return _located_lines(path, line_decoder().decode, self.parse, self._from_line)

    def _from_line(self, g: Any) -> Record:
        """The `Record` of a line decoded and checked by `line_decoder`."""
        decisions = self._sequence(
            [
                self._decision(
                    x.stage, x.name, x.refused, x.score, x.threshold, x.raw, x.seconds,
                    x.unavailable,
                )
                for x in g.decisions
            ]
        )
        refused_by = g.refused_by
        return Record(
            g.record_id,
            self._prompt_id(g.prompt_id),
            g.seed,
            sys.intern(g.status),
            None if refused_by is None else sys.intern(refused_by),
            decisions,
            g.image_path,
            g.seconds,
            g.rank,
        )

    def parse(self, d: dict[str, Any]) -> Record:
        """The `Record` of a record line decoded by `json` (the lines `line_decoder` refuses),
        checked by `Generation.check`, its decisions shared where equal."""
        d = Generation.check(d)  # ValueError names the wrong field
        decisions = self._sequence(
            [
                self._decision(
                    x["stage"], x["name"], x["refused"], x.get("score"), x.get("threshold"),
                    x.get("raw"), x.get("seconds"), x.get("unavailable"),
                )
                for x in d.get("decisions", ())
            ]
        )
        return Record.from_checked(d, decisions)

    def _decision(
        self,
        stage: str,
        name: str,
        refused: bool | None,
        score: float | None,
        threshold: float | None,
        raw: dict[str, Any] | None,
        seconds: float | None,
        unavailable: str | None,
    ) -> Decision:
        """The `Decision` of these checked fields: the one already made for equal fields."""
        if raw and "concept_cos" in raw:  # keeps raw values (`redecide_raw`): never shared
            return Decision(
                sys.intern(stage), sys.intern(name), refused, score, threshold,
                redecide_raw(raw), seconds, unavailable,
            )
        key = (stage, name, refused, score, threshold, seconds, unavailable)
        found = self._decisions.get(key)
        if found is None:
            if len(self._decisions) >= self.LIMIT:
                self._decisions.clear()
                self._sequences.clear()
            found = self._decisions[key] = Decision(
                sys.intern(stage), sys.intern(name), refused, score, threshold, _NO_RAW,
                seconds, unavailable,
            )
        return found

    def _sequence(self, decisions: list[Decision]) -> tuple[Decision, ...]:
        """A record's decisions as one tuple, shared by every record with the same ones."""
        if not all(x.raw is _NO_RAW for x in decisions):
            return tuple(decisions)
        key = tuple(map(id, decisions))  # unique: the entry's value keeps these alive
        found = self._sequences.get(key)
        if found is None:
            found = self._sequences[key] = tuple(decisions)
        return found


@functools.cache
def line_decoder() -> msgspec.json.Decoder[Any]:
    """A decoder of one record line that checks it as `Generation.check` does: structs made
    from `Generation`'s and `StageDecision`'s own annotations and defaults (so the schema has
    one home, types.py), unknown fields refused. It accepts a subset of what `check` accepts,
    with the same values (an integer where a number belongs comes back as a float)."""
    decision = _line_struct(StageDecision, {})
    return msgspec.json.Decoder(_line_struct(Generation, {"decisions": tuple[decision, ...]}))


def _line_struct(cls: type, hints: dict[str, Any]) -> type:
    """A msgspec struct with `cls`'s dataclass fields, annotations (or `hints`) and defaults."""
    types = get_type_hints(cls)
    fields: list[Any] = []
    for f in dataclass_fields(cls):
        hint = hints.get(f.name, types[f.name])
        if f.default is not MISSING:
            fields.append((f.name, hint, f.default))
        elif f.default_factory is not MISSING:
            fields.append((f.name, hint, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, hint))
    return msgspec.defstruct(f"{cls.__name__}Line", fields, forbid_unknown_fields=True)


def _generation_of(line: Any) -> Generation:
    """The `Generation` of a line decoded by `line_decoder` (its fields in order, each decision
    a `StageDecision`)."""
    fields = list(msgspec.structs.astuple(line))
    fields[_DECISIONS] = tuple(StageDecision(*msgspec.structs.astuple(x)) for x in line.decisions)
    return Generation(*fields)


#: Where `decisions` sits among `Generation`'s fields (`_generation_of`).
_DECISIONS = [f.name for f in dataclass_fields(Generation)].index("decisions")


def _located_lines(
    path: Path,
    decode: Callable[[bytes], Any],
    parse: Callable[[dict[str, Any]], T],
    make: Callable[[Any], T],
) -> Iterator[tuple[int, int, T]]:
    """(byte offset, byte length without the newline, what a reader keeps) of each line of a
    JSONL file, decoded and checked in C (`decode`) and made into what the reader keeps
    (`make`). A line the decoder refuses is decoded by `json` and `parse`d instead, so it is
    accepted, dropped (a torn last line) or refused (naming the line and field) exactly as
    the JSON reader (`_numbered_jsonl`, then `parse_line`) does it."""
    at = 0
    for i, line in enumerate(_lines(path), 1):
        length = len(line) - line.endswith(b"\n")
        try:
            decoded = decode(line)
        except msgspec.MsgspecError:
            for n, d in _one_by_one(path, i, [line]):
                yield at, length, parse_line(path, n, d, parse)
        else:
            yield at, length, make(decoded)
        at += len(line)


@functools.cache
def _dataclass_decoder(cls: type) -> msgspec.json.Decoder[Any]:
    """`line_decoder` for a flat record type (a prompt, a verdict)."""
    return msgspec.json.Decoder(_line_struct(cls, {}))


def read_typed(
    path: Path, cls: type[T], make: Callable[[Any], T] | None = None
) -> Iterator[T]:
    """The `cls` records of a JSONL file (`Prompt`, `Verdict`), read as the JSON reader
    (`_numbered_jsonl`, then `cls.from_dict`) reads them (the same records and the same
    errors), about three times faster (`_located_lines`). `make`: the `cls` of a decoded line
    (default: its fields in order)."""
    return (v for _, _, v in _located_typed(path, cls, make))


def _located_typed(
    path: Path, cls: type[T], make: Callable[[Any], T] | None = None
) -> Iterator[tuple[int, int, T]]:
    """`_located_lines` of a flat record type: decoded by its struct, refused lines parsed by
    `cls.from_dict`, kept as `make` makes them (default: `cls` of the fields in order)."""
    astuple = msgspec.structs.astuple

    def fields_in_order(line: Any) -> T:  # the struct follows cls
        return cls(*astuple(line))

    decode, parse = _dataclass_decoder(cls).decode, cls.from_dict  # type: ignore[attr-defined]
    return _located_lines(path, decode, parse, make or fields_in_order)


class _StatusLine(msgspec.Struct):
    """The two fields of a record line `RunStore.statuses` reads (the others are skipped)."""

    record_id: str
    status: Literal["ok", "refused", "error"]


@functools.cache
def _status_decoder() -> msgspec.json.Decoder[_StatusLine]:
    return msgspec.json.Decoder(_StatusLine)


def _status_pair(line: _StatusLine) -> tuple[str, str]:
    return line.record_id, sys.intern(line.status)


def _status_of(d: dict[str, Any]) -> tuple[str, str]:
    """(record_id, status) of a record decoded by `json`; ValueError unless both are there."""
    rid, status = d.get("record_id"), d.get("status")
    if not isinstance(rid, str) or status not in ("ok", "refused", "error"):
        raise ValueError("a record without a text record_id and a status of ok, refused or error")
    return rid, status


#: The raw of a decision left with none (shared by every such decision: read only).
_NO_RAW: dict[str, Any] = {}
#: The `meta` of every prompt read from a run without extra columns: one dict, read only (no
#: reader of a run's prompts changes their meta; a 100,000-prompt run held 100,000 empty dicts).
_NO_META: dict[str, Any] = {}


def redecide_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """Of a decision's `raw`, the values `types.REDECIDE_RAW` names, kept only where the
    decision has per-concept cosines to re-decide (the safety checker's); every other
    decision shares one empty dict. Word lists, nearest phrases and a concept guard's
    per-category similarities are left out: at 100,000 records they were most of the memory
    and time of reading a run, and no reader of compact records uses them."""
    if "concept_cos" not in raw:
        return _NO_RAW
    return {k: raw[k] for k in REDECIDE_RAW if k in raw}


class _Latest(Protocol):
    @property
    def record_id(self) -> str: ...

    @property
    def status(self) -> str: ...


G = TypeVar("G", bound=_Latest)


def supersedes(prev: str | None, new: str) -> bool:
    """Whether a record of status `new` replaces an earlier one of the same id and status
    `prev` (None: there is none): unless it is an error (an error is retried; a result is
    never undone by a later failure)."""
    return prev is None or prev == "error" or new != "error"


def latest(records: Iterable[G], keep: Callable[[G], bool] | None = None) -> dict[str, G]:
    """record_id -> its latest record (`supersedes`), in order of first appearance.

    `keep`: only records whose latest one passes it are held, for a reader that needs few of
    a long run's records (the judge pass: delivered images). It must refuse errors, which then
    need not be held to know that a later error changes nothing."""
    out: dict[str, G] = {}
    for g in records:
        prev = out.get(g.record_id)
        if supersedes(None if prev is None else prev.status, g.status):
            if keep is None or keep(g):
                out[g.record_id] = g
            else:
                out.pop(g.record_id, None)
    return out


class RunManifest(TypedDict, total=False):
    """manifest.json, as written by the runner and the judge pass (readers check the types of
    the fields they use: `_check_manifest_fields`). Fields added by later versions are kept."""

    store_version: int
    status: str
    """running | complete | failed | interrupted."""
    error: str | None
    pid: int | None
    host: str | None
    pid_start: str | None
    argv: list[str]
    created_at: str
    updated_at: str
    versions: dict[str, str]
    git_commit: str | None
    suite: dict[str, Any]
    """name, version, source, digest, n_prompts, provenance (suite specs and recipes)."""
    system: dict[str, Any]
    """The system spec, redacted (header names and ${VAR} references only), and its digest."""
    history: list[dict[str, Any]]
    components: list[dict[str, Any]]
    """Per stage: name, weights (pretrained | random | fake | rules), info."""
    judges: dict[str, dict[str, Any]]
    """judge key -> kind, role, spec digest, weights, time of the last pass."""
    counts: dict[str, int]
    planned: int
    seeds: int
    limit: int | None
    per_category: int | None
    batch_size: int
    world_size: int
    batch_backoffs: list[dict[str, Any]]
    parent_run: str
    rewriter: dict[str, Any]


class RunStore:
    """One run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # paths -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def prompts_path(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def report_dir(self) -> Path:
        """report.md, summary.json, per_category.csv, per_prompt.csv."""
        return self.root / "report"

    def report_file(self, name: str) -> Path:
        """One of the report's files (`report.md`, `summary.json`, ...)."""
        return self.report_dir / name

    @property
    def html_dir(self) -> Path:
        """Where `report --html` writes by default."""
        return self.report_dir / "html"

    @property
    def sweep_dir(self) -> Path:
        """Threshold sweeps: curve.csv, one PNG per guard, proposed_thresholds.json."""
        return self.root / "sweep"

    @property
    def triggers_dir(self) -> Path:
        """Trigger words (loo.json, loo.csv) and the refusal predictor (predictor.json)."""
        return self.root / "triggers"

    def lock_path(self, rank: int = 0) -> Path:
        """The lock that keeps one process per run directory and rank."""
        return self.root / (".lock" if rank == 0 else f".lock-rank{rank}")

    def rewrite_dir(self, slug: str) -> Path:
        """The folder a rewrite experiment links to this run: beside it, named after it."""
        return self.root.parent / f"{self.root.name}__rw-{slug}"

    @property
    def index_path(self) -> Path:
        """The run's SQLite index for browsing at scale (`run_index.py` builds and refreshes
        it from the records; deleting it loses nothing)."""
        return self.root / "index.sqlite"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def generations_dir(self) -> Path:
        return self.root / "generations"

    @property
    def verdicts_dir(self) -> Path:
        return self.root / "verdicts"

    def generations_path(self, rank: int = 0) -> Path:
        return self.generations_dir / f"rank-{rank}.jsonl"

    def verdicts_path(self, judge_key: str) -> Path:
        return self.resolve(f"verdicts/{judge_key}.jsonl")

    def check_judge_spec(self, judge_key: str, digest: str) -> None:
        """Pin a judge's spec digest beside its verdicts; refuse to mix verdicts of two specs."""
        path = self.resolve(f"verdicts/{judge_key}.spec")
        if path.exists():
            old = path.read_text().strip()
            if old != digest:
                raise UserError(
                    f"judge {judge_key}: its spec (or its reference run) changed since "
                    f"{path.parent.name}/{judge_key}.jsonl "
                    f"was written (spec {old} vs {digest}); bump the judge's version"
                )
            return
        atomic_write_bytes(path, f"{digest}\n".encode())

    def resolve(self, rel: str) -> Path:
        """A path named inside a record or built from a name, confined to the run directory."""
        root = self.root.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or path == root:
            raise UserError(f"{rel}: path outside the run directory {root}")
        return path

    # manifest and prompts --------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            raise UserError(f"{self.root}: not a run directory (no manifest.json)")
        try:
            manifest = json.loads(_read_bytes(self.manifest_path).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise UserError(f"{self.manifest_path}: corrupt manifest (not JSON)") from None
        if not isinstance(manifest, dict):
            raise UserError(f"{self.manifest_path}: corrupt manifest (not a JSON object)")
        version = manifest.get("store_version")
        if version != STORE_VERSION:
            raise UserError(
                f"{self.root}: run directory format version {version!r}, this t2i-eval reads "
                f"version {STORE_VERSION}; use the t2i-eval version that wrote it or start a new run"
            )
        missing = [k for k in ("suite", "system") if not isinstance(manifest.get(k), dict)]
        if missing:
            raise UserError(
                f"{self.manifest_path}: missing {', '.join(missing)}; not a manifest "
                "written by t2i-eval run"
            )
        _check_manifest_fields(self.manifest_path, manifest)
        if interrupted(manifest):
            manifest["status"] = "interrupted"
            manifest["error"] = manifest.get("error") or (
                f"process {manifest['pid']} on {manifest['host']} stopped before the run "
                "finished (killed?); rerun the same command to resume"
            )
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, {**manifest, "store_version": STORE_VERSION})

    def update_manifest(self, **changes: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        manifest.update(changes)
        self.write_manifest(manifest)
        return manifest

    def write_prompts(self, prompts: Iterable[Prompt]) -> None:
        data = "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in prompts)
        atomic_write_bytes(self.prompts_path, data.encode("utf-8"))

    def read_prompts(self, intern_ids: bool = True) -> list[Prompt]:
        return list(self.iter_prompts(intern_ids))

    def iter_prompts(self, intern_ids: bool = True) -> Iterator[Prompt]:
        """`read_prompts` one at a time, for a reader that keeps only some. `intern_ids`: the
        id is the interned string, the one its records' prompt_id is (`CompactReader`); a
        reader that maps ids to prompts anyway shares them through that map instead
        (`read_run`), sparing the interpreter's table of 100,000 ids (4 MB)."""
        if not self.prompts_path.exists():
            raise UserError(f"{self.root}: no prompts.jsonl")
        intern = sys.intern
        own_id = intern if intern_ids else str

        def make(p: Any) -> Prompt:
            # a run's few categories and labels are one string each, and the id is the same
            # string as its records' prompt_id: at 100,000 prompts, 15 MB; prompts without
            # extra columns (most) share one empty `meta` (6 MB more)
            return Prompt(
                own_id(p.id), p.text, intern(p.category), intern(p.label), p.pair_id,
                p.parent_id, p.source, p.meta or _NO_META,
            )

        yield from read_typed(self.prompts_path, Prompt, make)

    # records -------------------------------------------------------------------------------
    def append_generations(self, gens: Iterable[Generation], rank: int = 0) -> None:
        append_jsonl(self.generations_path(rank), (g.to_dict() for g in gens))

    def generation_files(self) -> list[Path]:
        """Every rank's record file. A file where the folder belongs is damage, not "no
        records": a report of 0 / 0 would look like a clean run."""
        folder = self.root / "generations"
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder}: is a file where the records folder belongs; the run is damaged")
        return sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []

    def has_records(self) -> bool:
        """Whether any rank has written a record line (a run that never generated has none)."""
        return any(p.stat().st_size > 0 for p in self.generation_files())

    def read_generations(self) -> dict[str, Generation]:
        """Latest record per record_id over every rank's file (a retried error is superseded),
        whole (every raw score and message), each line decoded and checked in C as
        `read_records` reads it (`line_decoder`)."""
        decode = line_decoder().decode
        with gc_paused():
            return latest(
                g
                for path in self.generation_files()
                for _, _, g in _located_lines(path, decode, Generation.from_dict, _generation_of)
            )

    def read_records(self, prompt_id: Callable[[str], str] = sys.intern) -> dict[str, Record]:
        """`read_generations` as compact `Record`s: the same records, checked line by line
        the same way, without their texts, so counting a 100,000-record run holds tens of MB
        rather than every message and word list. `prompt_id`: as `CompactReader` takes it."""
        return latest(self.iter_records(prompt_id))

    def iter_records(self, prompt_id: Callable[[str], str] = sys.intern) -> Iterator[Record]:
        """Every record line of every rank as a compact `Record`, in file order (superseded
        ones too: `latest` picks), for a reader that keeps less than `read_records` does.
        Equal decisions are one shared tuple (`CompactReader`)."""
        reader = CompactReader(prompt_id)
        for path in self.generation_files():
            yield from reader.read(path)

    def statuses(self) -> dict[str, str]:
        """record_id -> latest status, streamed: a long run's end-of-run count holds one short
        string per record, not every record with its decisions. Only those two fields of each
        line are decoded (`_status_of`)."""
        out: dict[str, str] = {}
        decode = _status_decoder().decode
        for path in self.generation_files():
            for _, _, (rid, status) in _located_lines(path, decode, _status_of, _status_pair):
                if supersedes(out.get(rid), status):
                    out[rid] = status
        return out

    def save_image(self, record_id: str, image: Any) -> str:
        """Save a PIL image as PNG atomically; returns the path relative to the run dir."""
        import io

        rel = f"images/{record_id}.png"
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write_bytes(self.root / rel, buf.getvalue())
        return rel

    def remove_partial_images(self) -> int:
        """Delete the temp files of image writes that a killed process never finished.

        `atomic_write_bytes` names them `.<name>.<random>`; a reader never sees them as images,
        but each kill would leave a batch of them behind. Only safe while no other process
        writes images here (the runner calls it holding the run's lock, before any rank
        starts generating)."""
        folder = self.root / "images"
        stale = [p for p in folder.glob(".*") if p.is_file()] if folder.is_dir() else []
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def append_verdicts(self, judge_key: str, verdicts: Iterable[Verdict]) -> None:
        append_jsonl(self.verdicts_path(judge_key), (v.to_dict() for v in verdicts))

    def read_verdicts(self, judge_key: str) -> dict[str, Verdict]:
        path = self.verdicts_path(judge_key)
        if not path.exists():
            return {}
        return {v.record_id: v for v in read_typed(path, Verdict)}

    def verdict_keys(self) -> list[str]:
        folder = self.root / "verdicts"
        return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


@dataclass(frozen=True)
class RewriteFolder:
    """The folder a rewrite experiment links to its parent run (`RunStore.rewrite_dir` by
    default, or `--out`). It owns that folder's layout as `RunStore` owns a run directory's."""

    root: Path

    @property
    def rewrites_path(self) -> Path:
        """Every rewrite made, one JSON line each (the cache a rerun reuses)."""
        return self.root / "rewrites.jsonl"

    @property
    def plan_path(self) -> Path:
        """What was selected and rewritten, and how many rewrites were valid."""
        return self.root / "rewrite_plan.json"

    @property
    def run_dir(self) -> Path:
        """The linked run: the valid rewrites through the parent's system and seeds."""
        return self.root / "run"

    @property
    def report_path(self) -> Path:
        """The before/after report (markdown)."""
        return self.root / "report.md"

    @property
    def summary_path(self) -> Path:
        """The before/after numbers (JSON)."""
        return self.root / "summary.json"


# ---------------------------------------------------------------------------------------------
# Reading a run: one read path for every reader.


def weight_warnings(manifest: RunManifest | dict[str, Any]) -> list[str]:
    """One line per component whose numbers do not describe a real model.

    Plain text (names in quotes, no markup): it goes to summary.json and HTML as it is and
    through `md_cell` into Markdown."""
    out = []
    for c in manifest.get("components", []):
        if c.get("weights") == "random":
            out.append(f"{c['stage']} '{c['name']}' has RANDOM weights")
        elif c.get("weights") == "fake":
            out.append(f"{c['stage']} '{c['name']}' is a FAKE (no model)")
    for key, j in manifest.get("judges", {}).items():
        if j.get("weights") == "random":
            out.append(f"judge '{key}' uses a RANDOM-weight CLIP")
    return out


def judge_role(entry: dict[str, Any]) -> str:
    """The role of a judge recorded in the manifest (`types.OUTCOME_ROLES` or `none`).

    Manifests written before judges declared roles name only the kind; the built-in kinds
    that change outcomes are named after their roles."""
    role = entry.get("role")
    if isinstance(role, str):
        return role
    kind = entry.get("kind")
    return kind if kind in OUTCOME_ROLES else "none"


def pick_judges(
    manifest: RunManifest | dict[str, Any], present: list[str]
) -> dict[str, str | None]:
    """Per outcome role, the verdict file of the judge with that role run most recently."""
    runs = manifest.get("judges", {})
    out: dict[str, str | None] = {}
    for role in OUTCOME_ROLES:
        keys = [k for k, v in runs.items() if judge_role(v) == role and k in present]
        out[role] = max(keys, key=lambda k: runs[k].get("at", "")) if keys else None
    return out


@dataclass
class RunData:
    """Everything a reader needs from one run directory, read once (`read_run`)."""

    manifest: RunManifest
    prompts: list[Prompt]
    records: dict[str, Record]
    """record_id -> its latest record, compact (`Record`): what reports and stats count."""
    verdicts: dict[str, dict[str, Verdict]]
    """Outcome role (blank, sanitization, harm) -> record_id -> the verdict used."""
    judge_keys: dict[str, str | None]
    """Role -> the verdict file used (the judge of that role run most recently)."""
    root: Path = Path(".")
    """The run directory these were read from."""
    _outcomes: dict[str, tuple[Outcome, str | None]] | None = field(default=None, repr=False)
    _gens: dict[str, Generation] | None = field(default=None, repr=False)
    _by_id: dict[str, Prompt] | None = field(default=None, init=False, repr=False)
    """`prompts_by_id`, once made (not an init field: a copy with other prompts makes its own)."""

    @property
    def gens(self) -> dict[str, Generation]:
        """The same records whole (messages, errors, every raw value), read on first use:
        counting needs only `records`, and a 100,000-record run whole is hundreds of MB.
        Only records in `records` are kept, so every one has its outcome."""
        if self._gens is None:
            full = self.store.read_generations()
            self._gens = {rid: full[rid] for rid in self.records if rid in full}
        return self._gens

    @property
    def blank(self) -> dict[str, Verdict]:
        return self.verdicts.get("blank", {})

    @property
    def sanitization(self) -> dict[str, Verdict]:
        return self.verdicts.get("sanitization", {})

    @property
    def harm(self) -> dict[str, Verdict]:
        return self.verdicts.get("harm", {})

    @property
    def outcomes(self) -> dict[str, tuple[Outcome, str | None]]:
        """record_id -> (outcome, cause), computed once (`types.outcome` is the rule)."""
        if self._outcomes is None:
            self._outcomes = outcomes(self.records, self.blank, self.sanitization)  # type: ignore[arg-type]
        return self._outcomes

    def outcome(self, record_id: str) -> tuple[Outcome, str | None]:
        return self.outcomes[record_id]

    @property
    def prompts_by_id(self) -> dict[str, Prompt]:
        if self._by_id is None:
            self._by_id = {p.id: p for p in self.prompts}
        return self._by_id

    @property
    def store(self) -> RunStore:
        return RunStore(self.root)


def read_run(run_dir: str | Path) -> RunData:
    """Read a run directory once: manifest, prompts, records and the verdicts that decide
    outcomes. Every reader of runs (reports, triggers, the rewrite experiment) goes through
    here, so a damaged file is refused the same way everywhere. Records are streamed and kept
    compact (`RunStore.read_records`); `RunData.gens` reads them whole where one is shown."""
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    keys = pick_judges(manifest, store.verdict_keys())
    with gc_paused():
        verdicts = {role: store.read_verdicts(key) for role, key in keys.items() if key}
        prompts = store.read_prompts(intern_ids=False)
        by_id = {p.id: p for p in prompts}

        def prompt_id(pid: str) -> str:  # a record's prompt id: its prompt's own string
            p = by_id.get(pid)
            return sys.intern(pid) if p is None else p.id

        data = RunData(
            manifest,  # type: ignore[arg-type]
            prompts,
            store.read_records(prompt_id),
            verdicts,
            keys,
            store.root,
        )
        data._by_id = by_id
        return data
