"""Owns every path in a run directory; append-only records, atomic file writes.

Layout (STYLE.md section 6):
    manifest.json                    command, versions, suite digest, system spec, status, counts
    prompts.jsonl                    the exact prompts used
    generations/rank-<r>.jsonl       one Generation per line, append-only, one file per process
    images/<record_id>.png           every generated image (also the ones an image guard refused)
    verdicts/<judge>@<version>.jsonl one Verdict per line
    report/                          report.md, summary.json, per_category.csv
No torch here: reports and the explorer read runs anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UserError
from .types import Generation, Prompt, Verdict

log = logging.getLogger(__name__)

#: Bump when the layout or record fields change incompatibly; readers refuse other versions.
STORE_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    """Read records; a torn last line (a crash mid-write) is dropped with a warning."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: the write never finished
                log.warning(
                    "%s: dropped a torn last line (%d bytes); it will be redone", path, len(line)
                )
                continue
            raise UserError(f"{path} line {i + 1}: corrupt record (not JSON)") from None


def _append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
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
                f.truncate(keep)
                f.seek(0, os.SEEK_END)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


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
        return self.root / "report"

    def generations_path(self, rank: int = 0) -> Path:
        return self.root / "generations" / f"rank-{rank}.jsonl"

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
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
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

    def read_prompts(self) -> list[Prompt]:
        if not self.prompts_path.exists():
            raise UserError(f"{self.root}: no prompts.jsonl")
        return [Prompt.from_dict(d) for d in _read_jsonl(self.prompts_path)]

    # records -------------------------------------------------------------------------------
    def append_generations(self, gens: Iterable[Generation], rank: int = 0) -> None:
        _append_jsonl(self.generations_path(rank), (g.to_dict() for g in gens))

    def read_generations(self) -> dict[str, Generation]:
        """Latest record per record_id over every rank's file (a retried error is superseded)."""
        out: dict[str, Generation] = {}
        folder = self.root / "generations"
        for path in sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []:
            for n, d in enumerate(_read_jsonl(path), start=1):
                try:
                    g = Generation.from_dict(d)
                except TypeError as e:
                    raise UserError(
                        f"{path} record {n}: not a record of this t2i-eval version ({e}); "
                        "start a new run directory"
                    ) from None
                prev = out.get(g.record_id)
                if prev is None or prev.status == "error" or g.status != "error":
                    out[g.record_id] = g
        return out

    def statuses(self) -> dict[str, str]:
        """record_id -> latest status, streamed: a long run's end-of-run count holds one short
        string per record, not every record with its decisions."""
        out: dict[str, str] = {}
        folder = self.root / "generations"
        for path in sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []:
            for d in _read_jsonl(path):
                rid, status = d.get("record_id"), d.get("status")
                if rid is None or status is None:
                    raise UserError(
                        f"{path}: a record without record_id/status; not a record "
                        "of this t2i-eval version"
                    )
                if out.get(rid) in (None, "error") or status != "error":
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

    def append_verdicts(self, judge_key: str, verdicts: Iterable[Verdict]) -> None:
        _append_jsonl(self.verdicts_path(judge_key), (v.to_dict() for v in verdicts))

    def read_verdicts(self, judge_key: str) -> dict[str, Verdict]:
        path = self.verdicts_path(judge_key)
        if not path.exists():
            return {}
        return {v.record_id: v for v in (Verdict.from_dict(d) for d in _read_jsonl(path))}

    def verdict_keys(self) -> list[str]:
        folder = self.root / "verdicts"
        return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
