"""Plan (prompt, seed) work, skip what is finished, run the system in batches, store each record.

Resume is the default: rerunning the same command finds the same run directory and skips
records already finished (ok or refused); errors are retried. Nothing is held back for the end,
so a crash loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import platform
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import __version__
from .errors import UserError
from .store import RunStore
from .systems import SystemSpec, build_system, validate_spec
from .systems.base import ItemResult, WorkItem
from .types import Generation, Suite


def record_id(prompt_id: str, seed: int) -> str:
    """Stable key of one (prompt, seed) item: the same on every system, so runs pair up."""
    return hashlib.sha256(f"{prompt_id}\x1f{seed}".encode()).hexdigest()[:16]


def default_run_dir(suite: Suite, spec: SystemSpec, root: str | Path = "outputs") -> Path:
    """Same suite content + same system spec -> same folder, so rerunning resumes."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{suite.name}__{spec.name}").strip("-")[:80]
    digest = hashlib.sha256(f"{suite.digest}|{spec.digest}".encode()).hexdigest()[:8]
    return Path(root) / f"{slug}__{digest}"


def plan(suite: Suite, seeds: int, limit: int | None) -> list[WorkItem]:
    prompts = suite.prompts[:limit] if limit else suite.prompts
    return [WorkItem(record_id(p.id, s), p.id, p.text, s) for p in prompts for s in range(seeds)]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "t2i-eval": __version__}
    for pkg in ("torch", "diffusers", "transformers", "numpy", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return proc.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunResult:
    run_dir: Path
    planned: int
    skipped: int
    done: int
    counts: dict[str, int]
    failed: int = 0
    """Planned items still without a result (infrastructure errors): the run is not complete."""


def _to_generation(r: ItemResult, store: RunStore, rank: int) -> Generation:
    image_path = store.save_image(r.item.record_id, r.image) if r.image is not None else None
    return Generation(
        record_id=r.item.record_id,
        prompt_id=r.item.prompt_id,
        seed=r.item.seed,
        status=r.status,
        refused_by=r.refused_by,
        decisions=tuple(r.decisions),
        image_path=image_path,
        delivered=r.delivered,
        error=r.error,
        seconds=None if r.seconds is None else round(r.seconds, 4),
        rank=rank,
    )


def _open_store(store: RunStore, suite: Suite, spec: SystemSpec, argv: list[str]) -> None:
    """Create the manifest, or check that an existing run is the same suite and system."""
    if store.exists():
        m = store.read_manifest()
        if m["suite"]["digest"] != suite.digest or m["system"]["digest"] != spec.digest:
            raise UserError(
                f"{store.root}: holds a run of another suite or system (suite {m['suite']['digest']} "
                f"vs {suite.digest}, system {m['system']['digest']} vs {spec.digest}); "
                "pass a new --out to start a separate run"
            )
        history = [*m.get("history", []), _session(argv)]
        store.update_manifest(
            status="running",
            argv=argv,
            error=None,
            history=history,
            versions=_versions(),
            git_commit=_git_commit(),
        )
        return
    store.write_prompts(suite.prompts)
    store.write_manifest(
        {
            "status": "running",
            "argv": argv,
            "created_at": _now(),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "suite": {
                "name": suite.name,
                "version": suite.version,
                "source": suite.source,
                "digest": suite.digest,
                "n_prompts": len(suite),
            },
            "system": {**spec.to_dict(), "digest": spec.digest},
            "history": [_session(argv)],
        }
    )


def _session(argv: list[str]) -> dict[str, Any]:
    """One entry per start or resume: a run finished under other code says so."""
    return {"argv": argv, "at": _now(), "versions": _versions(), "git_commit": _git_commit()}


@contextlib.contextmanager
def _exclusive(store: RunStore) -> Iterator[None]:
    """One process per run directory: two copies of one command would each redo the other's work."""
    import fcntl

    if store.root.exists() and not store.root.is_dir():
        raise UserError(f"--out {store.root}: exists and is not a folder")
    try:
        store.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--out {store.root}: cannot create the run directory ({e.strerror})"
        ) from None

    path = store.root / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(
                f"{store.root}: in use by another t2i-eval process "
                f"(pid {f.read().strip() or '?'}); wait for it or pass another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(
    suite: Suite,
    spec: SystemSpec,
    *,
    seeds: int = 1,
    limit: int | None = None,
    batch_size: int = 8,
    out: str | Path | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
    judges: tuple[str, ...] = ("blank",),
) -> RunResult:
    """Generate every planned (prompt, seed) item not yet finished, then judge."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1 (got {seeds})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1 (got {limit})")
    validate_spec(spec)
    store = RunStore(out or default_run_dir(suite, spec))
    argv = list(argv if argv is not None else sys.argv)
    with _exclusive(store):
        _open_store(store, suite, spec, argv)
        return _run_locked(store, suite, spec, seeds, limit, batch_size, progress, judges)


def _run_locked(
    store: RunStore,
    suite: Suite,
    spec: SystemSpec,
    seeds: int,
    limit: int | None,
    batch_size: int,
    progress: bool,
    judges: tuple[str, ...],
) -> RunResult:
    rank = 0  # one process per run directory (multi-process sharding: see the runner issue)

    items = plan(suite, seeds, limit)
    finished = {
        rid
        for rid, g in store.read_generations().items()
        if g.status != "error" and (g.image_path is None or store.resolve(g.image_path).exists())
    }
    todo = [it for it in items if it.record_id not in finished]
    try:
        if todo:
            system = build_system(spec)
            store.update_manifest(
                components=[
                    {"stage": stage, "name": c.name, "weights": c.weights, "info": c.info()}
                    for stage, c in system.components()
                ]
            )
            bar = tqdm(
                total=len(todo),
                desc=f"run {spec.name}",
                unit="img",
                disable=not progress,
                dynamic_ncols=True,
            )
            with bar:
                for start in range(0, len(todo), batch_size):
                    batch = todo[start : start + batch_size]
                    results = system.run(batch)
                    store.append_generations(
                        [_to_generation(r, store, rank) for r in results], rank
                    )
                    bar.update(len(batch))
        from .judges import judge_run

        for ref in judges:
            judge_run(store.root, ref, progress=progress)
    except BaseException as e:
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        store.update_manifest(status="failed", error=reason, updated_at=_now())
        raise
    gens = store.read_generations()
    counts = dict(Counter(g.status for g in gens.values()))
    planned_ids = {it.record_id for it in items}
    missing = len(planned_ids - {rid for rid, g in gens.items() if g.status != "error"})
    store.update_manifest(
        status="complete" if not missing else "failed",
        error=None
        if not missing
        else f"{missing} item(s) ended in infrastructure errors; rerun the same command to retry them",
        counts=counts,
        planned=len(items),
        seeds=seeds,
        limit=limit,
        batch_size=batch_size,
        updated_at=_now(),
    )
    return RunResult(store.root, len(items), len(items) - len(todo), len(todo), counts, missing)
