"""Plan (prompt, seed) work, skip what is finished, run the system in batches, store each record.

Resume is the default: rerunning the same command finds the same run directory and skips
records already finished (ok or refused); errors are retried. Nothing is held back for the end,
so a crash loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
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
from .net import redact_options
from .run_index import refresh_index
from .store import RunStore, writer_info
from .systems import SystemSpec, build_system, validate_spec
from .systems.chain import BatchTooLarge, ItemResult, WorkItem
from .types import Generation, Prompt, Suite

log = logging.getLogger(__name__)


def record_id(prompt_id: str, seed: int) -> str:
    """Stable key of one (prompt, seed) item: the same on every system, so runs pair up."""
    return hashlib.sha256(f"{prompt_id}\x1f{seed}".encode()).hexdigest()[:16]


def default_run_dir(suite: Suite, spec: SystemSpec, root: str | Path = "outputs") -> Path:
    """Same suite content + same system spec -> same folder, so rerunning resumes."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{suite.name}__{spec.name}").strip("-")[:80]
    digest = hashlib.sha256(f"{suite.digest}|{spec.digest}".encode()).hexdigest()[:8]
    return Path(root) / f"{slug}__{digest}"


def select(suite: Suite, limit: int | None = None, per_category: int | None = None) -> list[Prompt]:
    """The prompts a run covers, in suite order.

    `per_category` keeps the first N of each (category, label) group, so a quick look at a
    suite sorted by category still sees every category on both sides; `limit` then keeps the
    first N of what is left. Both are deterministic, so a rerun resumes the same items."""
    prompts = list(suite.prompts)
    if per_category:
        taken: Counter[tuple[str, str]] = Counter()
        kept = []
        for p in prompts:
            group = (p.category, p.label)
            if taken[group] < per_category:
                taken[group] += 1
                kept.append(p)
        prompts = kept
    return prompts[:limit] if limit else prompts


def plan(
    suite: Suite, seeds: int, limit: int | None, per_category: int | None = None
) -> list[WorkItem]:
    """Every (prompt, seed) work item of a run, in a fixed order, so reruns resume the same
    items."""
    prompts = select(suite, limit, per_category)
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


@dataclass
class Ranks:
    """This process's share of a multi-process run (torchrun / accelerate launch)."""

    rank: int = 0
    world: int = 1
    barrier: Any = None

    def wait(self) -> None:
        if self.barrier is not None:
            self.barrier()

    def owns(self, rid: str) -> bool:
        """Shares by a stable hash of the record id, so every rank computes the same split
        whatever the others have already written."""
        return int(rid, 16) % self.world == self.rank


def ranks() -> Ranks:
    """Ranks from the launcher's environment through accelerate's PartialState (gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if torch.cuda.is_available():
        torch.cuda.set_device(state.local_process_index)  # "cuda" = this rank's own GPU
    return Ranks(state.process_index, state.num_processes, state.wait_for_everyone)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunResult:
    """What a run did: its folder, items planned, done before, generated now, counts, failures."""
    run_dir: Path
    planned: int
    skipped: int
    done: int
    counts: dict[str, int]
    failed: int = 0
    """Planned items still without a result (infrastructure errors): the run is not complete."""
    rank: int = 0
    """The process that returns this result; only rank 0 judges and reports."""


def _to_generation(r: ItemResult, image_path: str | None, rank: int) -> Generation:
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


def _finished(store: RunStore) -> set[str]:
    """Record ids already done: ok or refused, with their image still on disk (errors and
    lost images are redone). One pass over the records; empty on a fresh run."""
    return {
        rid
        for rid, g in store.read_records().items()
        if g.status != "error" and (g.image_path is None or store.resolve(g.image_path).exists())
    }


def _open_store(store: RunStore, suite: Suite, spec: SystemSpec, argv: list[str]) -> set[str]:
    """Create the manifest, or check that an existing run is the same suite and system and
    that its records are readable; returns the ids already finished.

    Everything is checked before the manifest changes: a resume that cannot start leaves the
    run as it was. The manifest is written before prompts.jsonl: a folder holding files but no
    manifest is then never one of ours, and a process killed between the two leaves a run that
    the next start completes (it writes the missing prompts)."""
    if store.exists() and _only_a_failed_start(store, suite, spec):
        log.warning(
            "%s: replacing a run that failed before generating anything (%s)",
            store.root,
            store.read_manifest().get("error"),
        )
    elif store.exists():
        m = store.read_manifest()
        old_suite, old_system = m["suite"].get("digest"), m["system"].get("digest")
        if old_suite != suite.digest or old_system != spec.digest:
            raise UserError(
                f"{store.root}: holds a run of another suite or system (suite {old_suite} "
                f"vs {suite.digest}, system {old_system} vs {spec.digest}); "
                "pass a new --out to start a separate run"
            )
        finished = _finished(store)
        history = [*m.get("history", []), _session(argv)]
        store.update_manifest(
            status="running",
            **writer_info(),
            argv=argv,
            error=None,
            history=history,
            versions=_versions(),
            git_commit=_git_commit(),
        )
        if not store.prompts_path.exists():
            store.write_prompts(suite.prompts)
        store.remove_partial_images()
        return finished
    store.write_manifest(
        {
            "status": "running",
            **writer_info(),
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
                **({"provenance": suite.provenance} if suite.provenance else {}),
            },
            # a literal key in an option is rejected later; it must not reach the disk first
            "system": {**redact_options(spec.to_dict()), "digest": spec.digest},
            "history": [_session(argv)],
        }
    )
    store.write_prompts(suite.prompts)
    return set()


def _only_a_failed_start(store: RunStore, suite: Suite, spec: SystemSpec) -> bool:
    """A run of another configuration that failed before writing a single record (a model
    that would not load, say): nothing in it is worth keeping, so the corrected command may
    take its folder instead of being told to pick another --out."""
    m = store.read_manifest()
    same = (m["suite"].get("digest"), m["system"].get("digest")) == (suite.digest, spec.digest)
    return not same and m["status"] in ("failed", "interrupted") and not store.has_records()


def _session(argv: list[str]) -> dict[str, Any]:
    """One entry per start or resume: a run finished under other code says so."""
    return {"argv": argv, "at": _now(), "versions": _versions(), "git_commit": _git_commit()}


@contextlib.contextmanager
def _exclusive(store: RunStore, rank: int = 0) -> Iterator[None]:
    """One process per run directory and rank: two copies of one command would each redo the
    other's work."""
    import fcntl

    if store.root.exists() and not store.root.is_dir():
        raise UserError(f"--out {store.root}: exists and is not a folder")
    if store.root.is_dir():
        # until the manifest exists, every file of ours starts with a dot (lock, temp files);
        # listed before checking for the manifest, as another rank may be writing it now
        foreign = sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))
        if foreign and not store.exists():
            raise UserError(
                f"--out {store.root}: a folder with other files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}) and no manifest.json, so not a run "
                "directory; pass a new or empty folder"
            )
    try:
        store.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--out {store.root}: cannot create the run directory ({e.strerror})"
        ) from None

    path = store.lock_path(rank)
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


@dataclass(frozen=True)
class RunOptions:
    """How a run covers its suite and runs its system: what `t2i-eval run`'s flags set."""

    seeds: int = 1
    """Seeds per prompt (0 .. seeds-1)."""
    limit: int | None = None
    """The first N prompts (after per_category)."""
    per_category: int | None = None
    """The first N prompts of each (category, label)."""
    batch_size: int = 8
    """Items per generation batch (halved on out-of-memory)."""
    progress: bool = True
    judges: tuple[str, ...] = ("blank",)
    """Judges run on rank 0 after generation."""
    compile_unet: bool = False
    """torch.compile a diffusers generator's denoiser (speed only: results unchanged)."""

    def check(self) -> None:
        """One-line errors for values no run can use, before anything is written."""
        for flag, value in (("--seeds", self.seeds), ("--batch-size", self.batch_size)):
            if value < 1:
                raise UserError(f"{flag} must be >= 1 (got {value})")
        for flag, opt in (("--limit", self.limit), ("--per-category", self.per_category)):
            if opt is not None and opt < 1:
                raise UserError(f"{flag} must be >= 1 (got {opt})")


def run(
    suite: Suite,
    spec: SystemSpec,
    *,
    seeds: int = 1,
    limit: int | None = None,
    per_category: int | None = None,
    batch_size: int = 8,
    out: str | Path | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
    judges: tuple[str, ...] = ("blank",),
    compile_unet: bool = False,
) -> RunResult:
    """Generate every planned (prompt, seed) item not yet finished, then judge.

    Under torchrun / `accelerate launch` each rank generates its share into its own record
    file; rank 0 then judges and writes the manifest. `compile_unet` asks a diffusers
    generator to torch.compile its denoiser (a speed option: results and run id unchanged).
    Keyword arguments are `RunOptions`' fields, plus `out` (the run directory; derived from
    suite and system when None) and `argv` (recorded in the manifest)."""
    opts = RunOptions(seeds, limit, per_category, batch_size, progress, tuple(judges), compile_unet)
    opts.check()
    _check_size(suite, seeds, limit, per_category)
    validate_spec(spec)
    store = RunStore(out or default_run_dir(suite, spec))
    argv = list(argv if argv is not None else sys.argv)
    share = ranks()
    with _exclusive(store, share.rank):
        finished = _open_store(store, suite, spec, argv) if share.rank == 0 else set()
        share.wait()  # the manifest exists before any other rank reads it
        if share.rank != 0:
            m = store.read_manifest()
            if (m["suite"].get("digest"), m["system"].get("digest")) != (suite.digest, spec.digest):
                raise UserError(f"{store.root}: rank {share.rank} sees another suite or system")
            finished = _finished(store)
        return _run_locked(store, suite, spec, opts, share, finished)


#: The most (prompt, seed) items one run plans. Work items are planned up front (resume needs
#: the whole list to skip what is done), at ~0.5 kB each: 2 million is ~1 GB, beyond which a
#: typo such as `--seeds 2000000000` would only end in the out-of-memory killer.
MAX_ITEMS = 2_000_000


def _check_size(suite: Suite, seeds: int, limit: int | None, per_category: int | None) -> None:
    n = len(select(suite, limit, per_category))
    if n * seeds > MAX_ITEMS:
        raise UserError(
            f"{n:,} prompts x {seeds:,} seeds = {n * seeds:,} items, more than one run plans "
            f"({MAX_ITEMS:,}); lower --seeds, or split the suite with --limit / --per-category"
        )


def _run_locked(
    store: RunStore,
    suite: Suite,
    spec: SystemSpec,
    opts: RunOptions,
    share: Ranks | None = None,
    finished: set[str] | None = None,
) -> RunResult:
    share = share or Ranks()
    rank = share.rank
    items = plan(suite, opts.seeds, opts.limit, opts.per_category)
    finished = _finished(store) if finished is None else finished
    pending = [it for it in items if it.record_id not in finished]  # all ranks' work
    todo = [it for it in pending if share.owns(it.record_id)]  # this rank's share
    backoffs: list[dict[str, Any]] = []
    system: Any = None  # built only when there is work
    try:
        if todo:
            system = build_system(spec)
            if opts.compile_unet and hasattr(system.generator, "compile"):
                system.generator.compile()
            if rank == 0:
                store.update_manifest(
                    components=[
                        {
                            "stage": stage,
                            "name": c.name,
                            "weights": c.weights,
                            "info": redact_options(c.info()),
                        }
                        for stage, c in system.components()
                    ]
                )
            _generate(
                store,
                system,
                todo,
                opts.batch_size,
                rank,
                opts.progress and rank == 0,
                f"run {spec.name}",
                backoffs,
            )
        share.wait()  # every rank's records are on disk before rank 0 judges and counts
        if rank != 0:
            return RunResult(store.root, len(items), 0, len(todo), {}, 0, rank)
        from .judging import judge_run

        for ref in opts.judges:
            judge_run(store.root, ref, progress=opts.progress)
    except BaseException as e:
        if rank == 0:
            if isinstance(e, KeyboardInterrupt):
                status, reason = (
                    "interrupted",
                    "interrupted (Ctrl-C); rerun the same command to resume",
                )
            else:
                status, reason = "failed", f"{type(e).__name__}: {e}"
            store.update_manifest(status=status, error=reason, updated_at=_now())
        raise
    statuses = store.statuses()
    counts = dict(Counter(statuses.values()))
    missing = sum(statuses.get(it.record_id, "error") == "error" for it in items)
    planned, generated = len(items), len(pending)
    # the run's closing steps (the explorer's index over every record, then the caller's report)
    # must not hold more than generating did: the work lists, the statuses and the system (a
    # model, or a 100,000-prompt run's ~25 MB of lists) are let go first
    del statuses, items, pending, todo, system
    manifest = store.read_manifest()
    store.update_manifest(
        status="complete" if not missing else "failed",
        error=None
        if not missing
        else f"{missing} item(s) ended in infrastructure errors; rerun the same command to retry them",
        counts=counts,
        planned=planned,
        seeds=opts.seeds,
        limit=opts.limit,
        per_category=opts.per_category,
        batch_size=opts.batch_size,
        world_size=share.world,
        batch_backoffs=[*manifest.get("batch_backoffs", []), *backoffs],
        updated_at=_now(),
    )
    refresh_index(store.root)  # the explorer opens the finished run at once
    return RunResult(store.root, planned, planned - generated, generated, counts, missing)


def _generate(
    store: RunStore,
    system: Any,
    todo: list[WorkItem],
    batch_size: int,
    rank: int,
    progress: bool,
    desc: str,
    backoffs: list[dict[str, Any]],
) -> None:
    """Run batches; PNG encoding and writes happen on a background thread while the next batch
    generates, and a batch's records are appended only once its images are on disk. A batch
    that runs out of device memory is retried at half the size (recorded in `backoffs`)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    pending: tuple[list[ItemResult], list[Future[str] | None]] | None = None

    def flush() -> None:
        results, futures = pending
        paths = [f.result() if f is not None else None for f in futures]
        store.append_generations(
            [_to_generation(r, p, rank) for r, p in zip(results, paths, strict=True)], rank
        )
        bar.update(len(results))

    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="png") as writer:
        start, size = 0, batch_size
        while start < len(todo):
            batch = todo[start : start + size]
            try:
                results = system.run(batch)
            except BatchTooLarge as e:
                new = max(1, size // 2)
                backoffs.append(
                    {"from": size, "to": new, "rank": rank, "error": str(e)[:200], "at": _now()}
                )
                _free_device_memory()
                size = new
                continue
            futures = [
                writer.submit(store.save_image, r.item.record_id, r.image)
                if r.image is not None
                else None
                for r in results
            ]
            if pending is not None:
                flush()
            pending = (results, futures)
            start += len(batch)
        if pending is not None:
            flush()


def _free_device_memory() -> None:
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
