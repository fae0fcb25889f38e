"""The explorer's data side: find runs, pair two runs row by row, filter, page, find images.

No Gradio, no HTML and no torch here (`render` turns rows into HTML, `app` serves them), so it
can be tested without a browser and reused by other views. Runs are read through the store.
Rows of run A and run B are matched by (prompt, seed): the prompt is the root of its rewrite
chain (`parent_id` or `id`), so a run and its rewritten twin (`t2i-eval rewrite`) line up as well
as two systems on the same suite.

Images are referenced by (run, record id), never by path: the app's own image route looks both up
among the runs it found and that run's records, and the store resolves the file (`image_url`,
`read_image`). No Gradio file route serves anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import UserError
from ..stats import Table, fmt_clustered, run_table
from ..store import RunData, RunStore, read_run
from ..types import CATEGORIES, HARD_CAUSES, Generation, Outcome

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


@dataclass
class RunView:
    """A run read once: its manifest, table and one `Side` per (root prompt id, seed)."""

    name: str
    path: Path
    data: RunData
    sides: dict[tuple[str, int], Side]
    prompts: dict[str, Any]
    """root prompt id -> the Prompt (category, label, text of the original)."""

    @property
    def manifest(self) -> dict[str, Any]:
        return self.data.manifest

    def table(self) -> Table:
        return run_table(self.data)


def _side(data: RunData, gen: Any, root: Path) -> Side:
    rid = gen.record_id
    blank, san, harm = (data.blank.get(rid), data.sanitization.get(rid), data.harm.get(rid))
    out, cause = data.outcome(rid)
    side = Side(rid, out, cause)
    reasons = [f"{d.stage}:{d.name}: {d.message}" for d in gen.decisions if d.message]
    if gen.error:
        reasons.append(f"error: {gen.error}")
    if out is Outcome.REFUSED and gen.refused_by:
        side.decider = gen.refused_by
        for d in gen.decisions:
            if f"{d.stage}:{d.name}" == gen.refused_by:
                side.score, side.threshold = d.score, d.threshold
    elif out in (Outcome.BLOCKED, Outcome.SANITIZED):
        v = blank if out is Outcome.BLOCKED else san
        side.decider = f"judge:{v.judge}" if v else ""
        side.score, side.threshold = (v.score, v.threshold) if v else (None, None)
    for kind, v in (("blank", blank), ("sanitization", san), ("harm", harm)):
        if v is not None:
            side.verdicts[kind] = v
            if v.reason:
                reasons.append(f"{kind}: {v.reason}")
    side.reasons, side.gen, side.root = reasons, gen, root
    return side


def load_view(runs_dir: str | Path, name: str) -> RunView:
    """Read run `name` (relative to `runs_dir`) once; the caller caches it."""
    root = Path(runs_dir).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise UserError(f"{name}: not a run under {root}")
    data = read_run(path)
    by_id = {p.id: p for p in data.prompts}

    def root_of(pid: str) -> str:
        seen = set()
        while pid in by_id and by_id[pid].parent_id and pid not in seen:
            seen.add(pid)
            pid = by_id[pid].parent_id
        return pid

    weights = {
        f"{c.get('stage')}:{c.get('name')}": str(c.get("weights", "?"))
        for c in data.manifest.get("components", [])
    }
    sides, prompts = {}, {}
    for gen in data.gens.values():
        p = by_id.get(gen.prompt_id)
        if p is None:
            continue
        key = (root_of(p.id), gen.seed)
        side = _side(data, gen, path)
        side.text, side.weights = p.text, weights
        sides[key] = side
        prompts.setdefault(key[0], by_id.get(key[0], p))
    return RunView(name, path, data, sides, prompts)


class ViewCache:
    """Run views keyed by name, reloaded when a run's record or verdict files change (a run
    still in progress shows its new records on the next filter)."""

    def __init__(self, runs_dir: str | Path, keep: int = 4) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        self.keep = keep
        """Run views kept in memory (least recently used dropped first)."""
        self._views: dict[str, tuple[tuple, RunView]] = {}

    def _stamp(self, name: str) -> tuple:
        """What changes when the run does: its manifest, record and verdict files."""
        store = RunStore(self.runs_dir / name)
        files = [store.manifest_path]
        for folder in (store.generations_dir, store.verdicts_dir):
            if folder.is_dir():
                files += sorted(folder.iterdir())
        stamp = []
        for f in files:
            try:  # a temp file of an atomic write may vanish between listing and stat
                st = f.stat()
            except FileNotFoundError:
                continue
            stamp.append((f.name, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def get(self, name: str) -> RunView:
        stamp = self._stamp(name)
        hit = self._views.pop(name, None)
        if hit is None or hit[0] != stamp:
            hit = (stamp, load_view(self.runs_dir, name))
        self._views[name] = hit  # most recently used last
        while len(self._views) > self.keep:
            self._views.pop(next(iter(self._views)))
        return hit[1]


def pair_rows(a: RunView, b: RunView | None) -> list[Row]:
    """One row per (prompt, seed) of A, plus B's rows A lacks; ordered by category then text."""
    keys = list(a.sides) + ([k for k in b.sides if k not in a.sides] if b else [])
    rows = []
    for key in keys:
        p = a.prompts.get(key[0]) or (b.prompts.get(key[0]) if b else None)
        if p is None:
            continue
        rows.append(
            Row(key, p.category, p.label, p.text, a.sides.get(key), b.sides.get(key) if b else None)
        )
    order = {c: i for i, c in enumerate(CATEGORIES)}
    rows.sort(key=lambda r: (order.get(r.category, len(order)), r.category, r.text, r.key[1]))
    return rows


def _matches(side: Side | None, wanted: str) -> bool:
    if side is None:
        return False
    if wanted == ANY:
        return True
    if wanted == REFUSED_ANY:
        return side.outcome is Outcome.REFUSED
    if wanted.startswith(REFUSED_AT):
        return side.outcome is Outcome.REFUSED and side.cause == wanted.removeprefix(REFUSED_AT)
    return side.outcome == wanted


def _refused(side: Side | None) -> bool | None:
    return None if side is None else side.outcome.is_refusal(soft=True)


def filter_rows(
    rows: list[Row],
    category: str = "all",
    label: str = "all",
    wanted: str = "any",
    side: str = "A or B",
    text: str = "",
) -> list[Row]:
    """Rows matching every filter. `side` says where `wanted` must hold; "A and B differ" keeps
    rows where one run refused and the other did not (then `wanted` narrows either side)."""
    if wanted not in OUTCOME_FILTERS:
        raise UserError(f"outcome filter {wanted!r}: expected one of {', '.join(OUTCOME_FILTERS)}")
    if side not in SIDES:
        raise UserError(f"side {side!r}: expected one of {', '.join(SIDES)}")
    needle = text.strip().lower()
    out = []
    for r in rows:
        if category != "all" and r.category != category:
            continue
        if label != "all" and r.label != label:
            continue
        if (
            needle
            and needle not in r.text.lower()
            and not any(s is not None and needle in s.text.lower() for s in (r.a, r.b))
        ):
            continue
        if side == "A":
            ok = _matches(r.a, wanted)
        elif side == "B":
            ok = _matches(r.b, wanted)
        elif side == "A or B":
            ok = _matches(r.a, wanted) or _matches(r.b, wanted)
        else:
            ra, rb = _refused(r.a), _refused(r.b)
            ok = ra is not None and rb is not None and ra != rb
            ok = ok and (_matches(r.a, wanted) or _matches(r.b, wanted))
        if ok:
            out.append(r)
    return out


def page_of(rows: list[Row], page: int, size: int = PAGE_SIZE) -> tuple[list[Row], int, int]:
    """(rows of page `page` (1-based, clamped), the clamped page, number of pages)."""
    pages = max(1, -(-len(rows) // size))
    page = min(max(1, int(page)), pages)
    return rows[(page - 1) * size : page * size], page, pages


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
    gen = view.data.gens.get(record_id)
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
    table = view.table()
    out = []
    for cat in table.categories:
        b, u = table.cell(cat, "benign"), table.cell(cat, "unsafe")
        out.append([view.name, cat, fmt_clustered(b.refusal), fmt_clustered(u.refusal)])
    b, u = table.micro("benign"), table.micro("unsafe")
    out.append([view.name, "all (micro)", fmt_clustered(b.refusal), fmt_clustered(u.refusal)])
    return out
