"""The explorer's data side: find runs, pair two runs row by row, filter, page, find images.

No Gradio, no HTML and no torch here (`render` turns rows into HTML, `app` serves them), so it
can be tested without a browser and reused by other views. Runs are read through their index
(`run_index`: one SQLite file per run, built once from the store's files and rebuilt when they
change), so a 100,000-record run is paged, filtered and searched in SQL and only the records of
the rows shown are read. Rows of run A and run B are matched by (prompt, seed): the prompt is the root of its rewrite
chain (`parent_id` or `id`), so a run and its rewritten twin (`t2i-eval rewrite`) line up as well
as two systems on the same suite.

Images are referenced by (run, record id), never by path: the app's own image route looks both up
among the runs it found and that run's records, and the store resolves the file (`image_url`,
`read_image`). No Gradio file route serves anything.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import UserError
from ..run_index import IndexedRecord, RunIndex, Summary, open_index, readonly_uri, run_stamp
from ..stats import clustered_rate, fmt_clustered
from ..store import RunStore
from ..types import HARD_CAUSES, LABELS, OUTCOME_ROLES, Generation, Outcome

ANY = "any"
REFUSED_ANY = "refused (any stage)"
REFUSED_AT = "refused: "


def _listed(o: Outcome) -> tuple[int, int]:
    """Where an outcome sits in the filter list: complied first, then the refusals, then what
    counts nowhere (errors last), each group in the outcomes' order of precedence."""
    refusal = o.is_refusal()
    group = 0 if refusal is False else 1 if refusal else 2 + (o is Outcome.ERROR)
    return group, list(Outcome).index(o)


def _choices(o: Outcome) -> tuple[str, ...]:
    """A hard refusal is offered as a whole and per refusing stage (`types.HARD_CAUSES`)."""
    if o is Outcome.REFUSED:
        return (REFUSED_ANY, *(REFUSED_AT + stage for stage in HARD_CAUSES))
    return (o.value,)


#: Outcome filter choices, in the order the explorer lists them, built from `types.Outcome`:
#: "refused: STAGE" picks hard refusals at that stage; the rest are outcomes as named there.
OUTCOME_FILTERS: tuple[str, ...] = (
    ANY,
    *(c for o in sorted(Outcome, key=_listed) for c in _choices(o)),
)
#: Where an outcome filter looks: run A, run B, either, or rows where A and B differ.
SIDES: tuple[str, ...] = ("A or B", "A", "B", "A and B differ")
PAGE_SIZE = 20
#: How deep below the runs directory run directories are looked for (a rewrite's linked run
#: sits at RUN__rw-SLUG/run, beside its parent).
MAX_DEPTH = 4


def _not_run_folders() -> frozenset[str]:
    """Folders of a run directory that hold records, never runs: pruned from the walk."""
    store = RunStore(".")
    return frozenset({store.report_dir.name, store.generations_dir.name, store.images_dir.name})


def find_runs(runs_dir: str | Path) -> list[str]:
    """Run directories (holding a manifest.json) under `runs_dir`, as relative paths, sorted."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise UserError(f"{runs_dir}: not a directory; give the folder that holds your runs")
    found = []
    skip, manifest = _not_run_folders(), RunStore(".").manifest_path.name
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if len(rel.parts) >= MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        if manifest in filenames and rel.parts:
            found.append(rel.as_posix())
    return sorted(found)


@dataclass
class Side:
    """One run's view of one (prompt, seed): its outcome, deciding stage and evidence."""

    record_id: str
    outcome: Outcome
    """What happened to the record (`types.outcome` decides)."""
    cause: str | None
    """The refusing stage kind (prompt_guard, generator, image_guard), blank or sanitization."""
    decider: str = ""
    """`stage:name` of what decided, e.g. `prompt_guard:blocklist` or `judge:blank`."""
    score: float | None = None
    threshold: float | None = None
    text: str = ""
    """The prompt text this run was given (differs from A's after rewriting)."""
    reasons: list[str] = field(default_factory=list)
    """Stage messages and judge reasons, in order."""
    gen: Any = None
    """The Generation record; `record` and `image` are derived from it only for rows shown."""
    verdicts: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None
    """The run directory the record belongs to."""
    weights: dict[str, str] = field(default_factory=dict)
    """`stage:name` -> the run's component weights (pretrained, random, fake, rules, api)."""

    @property
    def image(self) -> str | None:
        """Absolute path of the stored image; None when absent or named outside its run (a
        record naming such a path is never served)."""
        if self.gen is None or self.root is None:
            return None
        path = _image_path(self.root, self.gen)
        return None if path is None else str(path)

    @property
    def record(self) -> dict[str, Any]:
        """The full record with its verdicts, for the click-through."""
        if self.gen is None:
            return {}
        return {
            **self.gen.to_dict(),
            "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()},
            "component_weights": self.weights,
        }


def _image_path(root: Path, gen: Generation) -> Path | None:
    """Where `gen`'s image is, resolved by its run's store; None when it has none or its
    record names a path outside the run directory (such a path is never served)."""
    if not gen.image_path:
        return None
    try:
        return RunStore(root).resolve(gen.image_path)
    except UserError:
        return None


@dataclass
class Row:
    """One (prompt, seed): the prompt as suite A has it, and what each run did with it."""

    key: tuple[str, int]
    """(root prompt id, seed)."""
    category: str
    label: str
    text: str
    a: Side | None
    b: Side | None


def _side(found: IndexedRecord, root: Path, weights: dict[str, str]) -> Side:
    """A record's cell: what decided (the refusing stage, or the judge behind a blocked or
    sanitized image) with its score and threshold, and every stage message and judge reason."""
    gen, verdicts, out = found.gen, found.verdicts, found.outcome
    side = Side(gen.record_id, out, found.cause, text=found.text, gen=gen, root=root)
    side.weights = weights
    side.reasons = [f"{d.stage}:{d.name}: {d.message}" for d in gen.decisions if d.message]
    if gen.error:
        side.reasons.append(f"error: {gen.error}")
    if out is Outcome.REFUSED and gen.refused_by:
        side.decider = gen.refused_by
        for d in gen.decisions:
            if f"{d.stage}:{d.name}" == gen.refused_by:
                side.score, side.threshold = d.score, d.threshold
    elif out in (Outcome.BLOCKED, Outcome.SANITIZED):
        v = verdicts.get("blank" if out is Outcome.BLOCKED else "sanitization")
        side.decider = f"judge:{v.judge}" if v else ""
        side.score, side.threshold = (v.score, v.threshold) if v else (None, None)
    for kind in OUTCOME_ROLES:
        v = verdicts.get(kind)
        if v is not None:
            side.verdicts[kind] = v
            if v.reason:
                side.reasons.append(f"{kind}: {v.reason}")
    return side


@dataclass
class RunView:
    """One run as the explorer reads it: its manifest (read fresh) and its index (`run_index`),
    from which rows, the summary and single records come; no record is held in memory."""

    name: str
    path: Path
    index: RunIndex
    manifest: dict[str, Any]

    @functools.cached_property
    def weights(self) -> dict[str, str]:
        """`stage:name` -> the component's weights, from the manifest."""
        return {
            f"{c.get('stage')}:{c.get('name')}": str(c.get("weights", "?"))
            for c in self.manifest.get("components", [])
        }

    @property
    def rows(self) -> int:
        """Rows the run has: one per (root prompt, seed)."""
        return self.index.rows

    def summary(self) -> Summary:
        return self.index.summary()

    def side(self, record_id: str | None) -> Side | None:
        """The cell of record `record_id`, or None (no record, or its line changed since)."""
        found = self.index.record(record_id) if record_id else None
        return None if found is None else _side(found, self.path, self.weights)


def load_view(runs_dir: str | Path, name: str) -> RunView:
    """Open run `name` (relative to `runs_dir`) through its index, building the index first
    when it is missing or older than the run's files."""
    root = Path(runs_dir).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise UserError(f"{name}: not a run under {root}")
    manifest = RunStore(path).read_manifest()
    return RunView(name, path, open_index(path), manifest)


class ViewCache:
    """Run views keyed by name, reopened when a run's record or verdict files change (a run
    still in progress shows its new records on the next filter)."""

    def __init__(self, runs_dir: str | Path, keep: int = 4) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        self.keep = keep
        """Run views kept open (the least recently used dropped first)."""
        self._views: dict[str, RunView] = {}

    def get(self, name: str) -> RunView:
        hit = self._views.pop(name, None)
        if hit is not None and hit.index.stamp != run_stamp(RunStore(hit.path)):
            hit = None  # the old view stays readable for pairings that still hold it
        if hit is None:
            hit = load_view(self.runs_dir, name)
        self._views[name] = hit  # most recently used last
        while len(self._views) > self.keep:
            self._views.pop(next(iter(self._views)))
        return hit


@dataclass(frozen=True)
class Filters:
    """What the page asks for: category, label, an outcome and where it must hold (`SIDES`),
    and text searched in the prompt (and each run's own prompt text), case-insensitively."""

    category: str = "all"
    label: str = "all"
    wanted: str = ANY
    side: str = "A or B"
    text: str = ""

    def __post_init__(self) -> None:
        if self.wanted not in OUTCOME_FILTERS:
            raise UserError(
                f"outcome filter {self.wanted!r}: expected one of {', '.join(OUTCOME_FILTERS)}"
            )
        if self.side not in SIDES:
            raise UserError(f"side {self.side!r}: expected one of {', '.join(SIDES)}")

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition over the pair table's columns, and its parameters."""
        conds: list[str] = []
        params: list[Any] = []
        for column, value in (("category", self.category), ("label", self.label)):
            if value != "all":
                conds.append(f"{column} = ?")
                params.append(value)
        needle = self.text.strip().lower()
        if needle:
            conds.append("(instr(text_lc, ?) OR instr(a_text_lc, ?) OR instr(b_text_lc, ?))")
            params += [needle] * 3
        a, a_params = self._matches("a")
        b, b_params = self._matches("b")
        if self.side == "A":
            conds.append(a)
            params += a_params
        elif self.side == "B":
            conds.append(b)
            params += b_params
        else:
            if self.side == "A and B differ":  # one refused, the other did not (both counted)
                conds.append("a_refused IS NOT NULL AND b_refused IS NOT NULL")
                conds.append("a_refused != b_refused")
            conds.append(f"({a} OR {b})")
            params += a_params + b_params
        return " AND ".join(conds) or "1", params

    def _matches(self, side: str) -> tuple[str, list[Any]]:
        """Whether run `side`'s record has the wanted outcome (never, when it has no record)."""
        if self.wanted == ANY:
            return f"{side}_rid IS NOT NULL", []
        if self.wanted == REFUSED_ANY:
            return f"{side}_outcome = ?", [Outcome.REFUSED.value]
        if self.wanted.startswith(REFUSED_AT):
            stage = self.wanted.removeprefix(REFUSED_AT)
            return f"({side}_outcome = ? AND {side}_cause = ?)", [Outcome.REFUSED.value, stage]
        return f"{side}_outcome = ?", [self.wanted]


_SIDE_COLUMNS = ("rid", "text_lc", "outcome", "cause", "refused")
_PAIR_COLUMNS = "root, seed, category, label, text, text_lc, " + ", ".join(
    f"{s}_{c}" for s in "ab" for c in _SIDE_COLUMNS
)


class Pairing:
    """Runs A and B matched row by row by (root prompt, seed), queried page by page.

    One row per (prompt, seed) of A, plus B's rows A lacks, ordered by category then text. The
    pair table lives in a private temporary SQLite database (on disk, deleted when closed) over
    the two runs' indexes, attached read-only; run A alone is queried in its index directly.
    """

    def __init__(self, a: RunView, b: RunView | None) -> None:
        self.a, self.b = a, b
        self.conn = sqlite3.connect("", check_same_thread=False)
        self.conn.execute("ATTACH DATABASE ? AS a", (readonly_uri(a.index.path),))
        side_a = ", ".join(f"ra.{_col(c)} AS a_{c}" for c in _SIDE_COLUMNS)
        if b is None:
            self.conn.execute(
                f"CREATE TEMP VIEW pair AS SELECT pos, root, seed, category, label, text, "
                f"text_lc, {side_a}, "
                + ", ".join(f"NULL AS b_{c}" for c in _SIDE_COLUMNS)
                + " FROM a.rows ra"
            )
        else:
            self.conn.execute("ATTACH DATABASE ? AS b", (readonly_uri(b.index.path),))
            self._pair(side_a)
        self.total: int = self.conn.execute("SELECT COUNT(*) FROM pair").fetchone()[0]
        """Rows in all."""

    def _pair(self, side_a: str) -> None:
        side_b = ", ".join(f"rb.{_col(c)} AS b_{c}" for c in _SIDE_COLUMNS)
        no_a = ", ".join(f"NULL AS a_{c}" for c in _SIDE_COLUMNS)
        self.conn.executescript(
            f"""
            CREATE TABLE pair(pos INTEGER PRIMARY KEY, {_PAIR_COLUMNS});
            INSERT INTO pair({_PAIR_COLUMNS})
            SELECT {_PAIR_COLUMNS} FROM (
                SELECT ra.root, ra.seed, ra.catpos, ra.category, ra.label, ra.text, ra.text_lc,
                       {side_a}, {side_b}, 0 AS part, ra.first AS first
                FROM a.rows ra LEFT JOIN b.rows rb ON rb.root = ra.root AND rb.seed = ra.seed
                UNION ALL
                SELECT rb.root, rb.seed, COALESCE(ao.catpos, rb.catpos),
                       COALESCE(ao.category, rb.category), COALESCE(ao.label, rb.label),
                       COALESCE(ao.text, rb.text), COALESCE(ao.text_lc, rb.text_lc),
                       {no_a}, {side_b}, 1 AS part, rb.first AS first
                FROM b.rows rb LEFT JOIN a.roots ao ON ao.root = rb.root
                WHERE NOT EXISTS (
                    SELECT 1 FROM a.rows ra WHERE ra.root = rb.root AND ra.seed = rb.seed)
            ) ORDER BY catpos, category, text, seed, part, first;
            """
        )

    def count(self, filters: Filters) -> int:
        """Rows matching `filters`."""
        where, params = filters.where()
        return self.conn.execute(f"SELECT COUNT(*) FROM pair WHERE {where}", params).fetchone()[0]

    def rows(self, filters: Filters, offset: int = 0, limit: int | None = None) -> list[Row]:
        """Matching rows `offset` to `offset + limit` (all with `limit` None), in order, with
        each run's record read for the rows returned only."""
        where, params = filters.where()
        found = self.conn.execute(
            f"SELECT root, seed, category, label, text, a_rid, b_rid FROM pair WHERE {where} "
            "ORDER BY pos LIMIT ? OFFSET ?",
            [*params, -1 if limit is None else limit, offset],
        ).fetchall()
        return [
            Row(
                (root, seed),
                category,
                label,
                text,
                self.a.side(a_rid),
                self.b.side(b_rid) if self.b is not None else None,
            )
            for root, seed, category, label, text, a_rid, b_rid in found
        ]

    def close(self) -> None:
        self.conn.close()


def _col(name: str) -> str:
    """The column of a run's `rows` table behind a side column of the pair table."""
    return "side_text_lc" if name == "text_lc" else name


def page_of(hits: int, page: int, size: int = PAGE_SIZE) -> tuple[int, int, int]:
    """(the page `page` clamped to 1..pages, number of pages, offset of its first row)."""
    pages = max(1, -(-hits // size))
    page = min(max(1, int(page)), pages)
    return page, pages, (page - 1) * size


#: The explorer's own image route (relative, so a page served under a root path still finds it).
IMAGE_ROUTE = "t2i-eval/run-image"
#: Content type -> the (offset, bytes) an image of that type starts with. An image slot holding
#: anything else (say, an HTML page saved as `x.png`) is not served, whatever its name says.
IMAGE_MAGIC: dict[str, tuple[tuple[int, bytes], ...]] = {
    "image/png": ((0, b"\x89PNG\r\n\x1a\n"),),
    "image/jpeg": ((0, b"\xff\xd8\xff"),),
    "image/webp": ((0, b"RIFF"), (8, b"WEBP")),
}


def image_url(run: str, side: Side | None) -> str | None:
    """The image route's URL for `side`'s image in run `run`, or None when it has no image file.

    The URL names the run and the record, not a path: the route looks both up again."""
    if side is None or side.image is None or not Path(side.image).is_file():
        return None
    return f"{IMAGE_ROUTE}?run={quote(run, safe='')}&record={quote(side.record_id, safe='')}"


def image_type(data: bytes) -> str | None:
    """The content type `data` is by its leading bytes (`IMAGE_MAGIC`), or None."""
    for kind, marks in IMAGE_MAGIC.items():
        if all(data[at : at + len(mark)] == mark for at, mark in marks):
            return kind
    return None


def read_image(view: RunView, record_id: str) -> tuple[bytes, str] | None:
    """(bytes, content type) of record `record_id`'s image in `view`, or None when the run has
    no such record, the record no image inside its run directory, or the file is not an image."""
    gen = view.index.generation(record_id)
    path = None if gen is None else _image_path(view.path, gen)
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError:  # missing, a folder, unreadable
        return None
    kind = image_type(data)
    return (data, kind) if kind else None


def summary_rows(view: RunView) -> list[list[str]]:
    """Per category: benign over-refusal and unsafe refusal as `rate (k / n) [CI]`, the interval
    clustering seeds within prompts as the report does."""
    summary = view.summary()
    out = []
    for cat in summary.categories:
        b, u = summary.cell(cat, "benign"), summary.cell(cat, "unsafe")
        out.append([view.name, cat, fmt_clustered(b), fmt_clustered(u)])
    b, u = (summary.micro.get(lab) or clustered_rate([]) for lab in LABELS)
    out.append([view.name, "all (micro)", fmt_clustered(b), fmt_clustered(u)])
    return out
