"""The judge pass over a run directory, and the reference-run workflow around it.

Every judging entry point goes through here: the runner (the default judges after generation),
`t2i-eval run` (extra judges, and sanitization against a reference run) and `t2i-eval judge`
(judging stored images again), and the rewrite experiment (harm on the linked run). So resuming,
"could not judge", spec pinning and the role recorded in the manifest behave the same for all.

Data flows one way: this module reads a run through `store`, builds judges from `judges/`
and writes verdicts back through `store`; `judges/` never imports it. It does not import the
runner either (the runner calls `judge_run`): `run_with_reference` takes the generation step
as a function.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from time import perf_counter
from typing import Any, Protocol, TypeVar

from .errors import UserError
from .judges import judge_class, judge_from_spec, load_spec, spec_digest, spec_key
from .judges.base import ROLES, JudgeItem
from .run_index import refresh_index
from .store import Record, RunStore, latest
from .types import Prompt, Verdict

log = logging.getLogger(__name__)

#: The judge `t2i-eval judge` runs when none is named.
DEFAULT_JUDGE = "blank"
#: The built-in judge a run with `--reference SYSTEM` adds unless a chosen judge has its role.
REFERENCE_JUDGE = "sanitization"
#: The role a judge comparing with a reference run declares.
REFERENCE_ROLE = "sanitization"

#: What PIL raises on files that are not (whole) images; SyntaxError and ValueError come from
#: some broken headers.
_UNREADABLE = (OSError, SyntaxError, ValueError)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _open_image(store: RunStore, rel: str) -> Any:
    from PIL import Image

    with Image.open(store.resolve(rel)) as img:
        img.load()
        return img.convert("RGB")


def _item(g: Record, image: Any, prompt: Prompt | None, reference: Any) -> JudgeItem:
    return JudgeItem(
        g.record_id,
        image,
        prompt.text if prompt else "",
        prompt.category if prompt else "",
        prompt.label if prompt else "",
        reference,
    )


def _reference(manifest: dict[str, Any], reference: str | Path) -> tuple[RunStore, dict[str, Any]]:
    """The reference run's store and manifest, after checking it ran the same suite."""
    ref_store = RunStore(reference)
    ref_manifest = ref_store.read_manifest()
    if ref_manifest["suite"].get("digest") != manifest["suite"].get("digest"):
        raise UserError(
            f"--reference {reference}: ran another suite (digest "
            f"{ref_manifest['suite'].get('digest')} vs {manifest['suite'].get('digest')})"
        )
    return ref_store, ref_manifest


def judge_run(
    run_dir: str | Path,
    ref: str = DEFAULT_JUDGE,
    *,
    reference: str | Path | None = None,
    clip: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[str, int]:
    """Judge every delivered image of a run that this judge has no usable verdict on yet.

    Returns (judge key, number of records judged). Resumable: records with a verdict are
    skipped, so rerunning costs nothing. Each verdict records its share of its batch's wall
    time (`timed`). An unreadable image gets a verdict with `flagged=None`
    ("could not judge"), never counted as a refusal, and is tried again next time. The judge's
    kind and declared role go into the manifest's `judges[key]`, where `store.pick_judges`
    finds which judge decides each outcome. `reference` is the run to compare with (judges
    with `needs_reference`); `clip` overrides the spec's CLIP model.
    """
    from tqdm import tqdm

    store = RunStore(run_dir)
    manifest = store.read_manifest()
    spec = load_spec(ref, clip=clip)
    cls = judge_class(spec["kind"])
    if cls.role not in ROLES:
        raise TypeError(f"{cls.__name__}.role is {cls.role!r}; expected one of {ROLES}")
    ref_gens: dict[str, Record] = {}
    ref_store = None
    pinned = dict(spec)
    # every input is checked before the judge is built: building may load a large model
    if cls.needs_reference:
        if reference is None:
            raise UserError(
                f"judge {spec['name']}@{spec['version']} compares with a reference run: "
                "pass --reference RUN_DIR"
            )
        ref_store, ref_manifest = _reference(manifest, reference)
        ref_gens = _delivered(ref_store)
        # verdicts are only valid against the reference they were made with
        pinned["reference_run"] = {
            "system": ref_manifest["system"]["digest"],
            "created_at": ref_manifest.get("created_at"),
            "path": str(ref_store.root.resolve()),
        }
    store.check_judge_spec(spec_key(spec), spec_digest(pinned))  # before a model loads
    judge = judge_from_spec(spec)
    # judged, or never to be judged: every missing vote was a provider refusing to look at the
    # image (content policy); asking again would only be refused again (vlm judge's `resend`)
    done = {
        rid
        for rid, v in store.read_verdicts(judge.key).items()
        if v.flagged is not None or v.raw.get("resend") is False
    }
    todo = [g for g in _delivered(store).values() if g.record_id not in done]
    wanted = {g.prompt_id for g in todo}  # a long run's end keeps only the prompts it judges
    prompts = {p.id: p for p in store.iter_prompts() if p.id in wanted}
    judges_info = dict(manifest.get("judges", {}))
    previous = judges_info.get(judge.key, {})
    judges_info[judge.key] = {
        "kind": spec["kind"],
        "role": cls.role,
        "weights": judge.weights,
        "reference": str(reference) if reference else None,
        "spec": spec.get("_path"),
        "clip": clip,
        # a rerun with nothing new to judge must not make this judge decide outcomes again
        "at": _now() if todo or not previous else previous.get("at", _now()),
    }
    store.update_manifest(judges=judges_info)
    bar = tqdm(
        total=len(todo), desc=f"judge {judge.key}", unit="img", disable=not progress or not todo
    )
    unreadable: list[str] = []
    with bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            items: list[JudgeItem] = []
            verdicts: list[Verdict] = []
            for g in chunk:
                try:
                    image = _open_image(store, g.image_path or "")
                except _UNREADABLE as e:
                    unreadable.append(f"{g.image_path} ({e})")
                    verdicts.append(
                        Verdict(g.record_id, judge.key, None, reason=f"could not read image: {e}")
                    )
                    continue
                reference_image = None
                rg = ref_gens.get(g.record_id)
                if rg is not None:  # a delivered reference image (`_delivered`)
                    try:
                        reference_image = _open_image(ref_store, rg.image_path)
                    except _UNREADABLE:
                        reference_image = None  # the judge says "no reference image"
                items.append(_item(g, image, prompts.get(g.prompt_id), reference_image))
            if items:
                verdicts += timed(judge.judge_batch, items)
            store.append_verdicts(judge.key, verdicts)
            bar.update(len(chunk))
    if unreadable:
        log.warning(
            "%s: %d image(s) could not be read, e.g. %s; recorded as unjudged (never a refusal) "
            "and tried again by the next judge pass. To generate them again, delete the files "
            "and rerun the run command",
            judge.key,
            len(unreadable),
            unreadable[0],
        )
    return judge.key, len(todo)


def _delivered(store: RunStore) -> dict[str, Record]:
    """record_id -> its latest record, where that is a delivered image (status ok, with an
    image), without its decisions: what the judge pass reads, held only for the records it can
    judge (none in a guards-only run, whose end of run then holds no records here).

    The same records as filtering `latest`'s, never holding the others (`latest(keep=...)`)."""

    def delivered(r: Record) -> bool:
        return r.status == "ok" and bool(r.image_path)

    records = (r._replace(decisions=()) if delivered(r) else r for r in store.iter_records())
    return latest(records, keep=delivered)


def timed(
    judge_batch: Callable[[list[JudgeItem]], list[Verdict]], items: list[JudgeItem]
) -> list[Verdict]:
    """`judge_batch(items)`, each verdict carrying its even share of the batch's wall time
    (`Verdict.seconds`), as the chain times its stages."""
    start = perf_counter()
    verdicts = judge_batch(items)
    per_item = round((perf_counter() - start) / max(len(verdicts), 1), 6)
    return [replace(v, seconds=per_item) for v in verdicts]


def judge_all(
    run_dir: str | Path,
    refs: Sequence[str],
    *,
    reference: str | Path | None = None,
    clip: str | None = None,
    progress: bool = True,
) -> Iterator[tuple[str, int]]:
    """Run several judges over a run, yielding (judge key, records judged) as each finishes.

    Yields rather than returns so a caller can report each judge at once: a later judge's
    failure (a missing model, a bad reference) does not hide what the earlier ones did."""
    for ref in refs:
        yield judge_run(run_dir, ref, reference=reference, clip=clip, progress=progress)
    if refs:  # new verdicts: the explorer's index is brought up to date while the user waits
        refresh_index(run_dir)


def plan_judges(refs: Sequence[str], *, clip: str | None, reference: bool) -> list[str]:
    """The judges a run command runs after generation, every spec checked before any work.

    With a reference system, `REFERENCE_JUDGE` is added first unless a chosen judge already
    has the sanitization role: comparing with the reference is the reason to run it."""
    specs = [load_spec(r, clip=clip) for r in refs]  # bad names fail before generation
    has_role = any(judge_class(s["kind"]).role == REFERENCE_ROLE for s in specs)
    return [REFERENCE_JUDGE, *refs] if reference and not has_role else list(refs)


class Generated(Protocol):
    """What `run_with_reference` needs of a generation result (runner.RunResult has it)."""

    run_dir: Path
    rank: int


R = TypeVar("R", bound=Generated)


def run_with_reference(
    generate: Callable[[Any, str | Path | None], R],
    system: Any,
    reference: Any | None = None,
    *,
    out: str | Path | None = None,
    reference_out: str | Path | None = None,
    judges: Sequence[str] = (),
    clip: str | None = None,
    progress: bool = True,
) -> tuple[R, R | None]:
    """Generate a run (and first its reference, same suite and seeds), then judge it.

    `generate(system, out)` is the generation pass (the runner's `run` with the suite and
    options bound), passed in so this module does not import the runner. With a `reference`
    system, the sanitization judge compares each image with the reference's image of the same
    prompt and seed (`plan_judges` adds it). Only rank 0 of a multi-process run judges.
    Returns (result, reference result or None)."""
    plan = plan_judges(judges, clip=clip, reference=reference is not None)
    ref_result = None
    if reference is not None:
        ref_result = generate(reference, reference_out)
        print(f"reference run: {ref_result.run_dir}", file=sys.stderr)
    result = generate(system, out)
    if result.rank == 0:  # rank 0 judges for the whole multi-process run
        ref_dir = ref_result.run_dir if ref_result is not None else None
        for _ in judge_all(result.run_dir, plan, reference=ref_dir, clip=clip, progress=progress):
            pass
    return result, ref_result
