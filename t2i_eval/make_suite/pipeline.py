"""The suite builder's steps, per category: generate -> near-duplicates out -> policy filter ->
boundary sampling (optional) -> kept, until the policy's targets are met or the generator runs
out; then an unsafe twin for kept look-alikes through the same steps; then the suite and its card.

Candidates are processed in chunks no larger than what is still needed, so no model is asked
about a candidate the suite will not use. Resumable: every model and system answer is cached
under `SUITE.jsonl.work/` (`cache.AnswerCache`) and sentence vectors in the shared embedding
cache, so rerunning the command after a crash or an outage asks nothing twice.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import UserError, did_you_mean, shorten
from ..store import atomic_write_bytes
from ..types import content_id
from .base import Candidate, Judge, Source
from .boundary import Boundary
from .cache import AnswerCache
from .card import STEPS, card_paths, make_card, write_card
from .dedup import Deduper
from .policy import CategoryPolicy, Policy, load_policy
from .policy_filter import SHIPPED_GUARDS, EmbedJudge, GuardsJudge, NoJudge, policy_filter


@dataclass(frozen=True)
class BuildOptions:
    """What `t2i-eval make-suite` passes; every field is one of its flags."""

    policy: str
    """The policy file."""
    out: str
    """The suite file to write (`.jsonl`); its card and work folder go beside it."""
    generator: str = "templates"
    """`templates` or `llm:MODEL`."""
    seed: int = 0
    """Shuffles the templates (the same seed, the same suite)."""
    templates: str | None = None
    """A templates folder instead of the shipped one."""
    judge: str = "auto"
    """`auto` (the generator's model for llm, else `embed`), `embed`, `none` or `llm:MODEL`."""
    judge_margin: float = 0.0
    """The `embed` judge's margin."""
    dedup_threshold: float | None = None
    """Cosine at or above which a candidate is a near-duplicate (default: the generator's)."""
    base_url: str | None = None
    """An OpenAI-compatible endpoint for `llm:` models."""
    api_key_env: str | None = None
    """The environment variable holding that endpoint's key."""
    max_new_tokens: int = 512
    """The most tokens an LLM answer may have."""
    per_request: int = 8
    """Look-alikes asked for per LLM request."""
    max_requests: int = 20
    """LLM generation requests per category at most."""
    target: str | None = None
    """A system for boundary sampling, or None."""
    keep_refused_at_least: float = 0.5
    """Keep look-alikes the target refuses on at least this share of seeds."""
    seeds: int = 1
    """Seeds per look-alike on the target."""
    progress: bool = True
    """Show progress bars."""


@dataclass
class BuildResult:
    """What a build wrote and asked."""

    suite: Path
    card: dict[str, Any]
    asked: int
    """Answers asked of a model or system in this process (0 on a rerun that resumed all)."""


JUDGES = ("auto", "embed", "guards[:A+B+...]", "none", "llm:MODEL")


def _out_path(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".jsonl":
        raise UserError(
            f"--out {shorten(out, 80)}: the suite is written as JSONL; give a path ending in .jsonl"
        )
    if path.is_dir():
        raise UserError(f"--out {shorten(out, 80)}: is a folder; give a file path ending in .jsonl")
    return path


def _source(opts: BuildOptions, cache: AnswerCache) -> Source:
    kind = opts.generator.partition(":")[0]
    if kind == "templates" and opts.generator == "templates":
        from .templates import TemplateSource

        return TemplateSource(opts.templates, seed=opts.seed)
    if kind == "llm":
        from .llm import LLMSource, build_chat

        if opts.per_request < 1 or opts.max_requests < 1:
            raise UserError("--per-request and --max-requests must be >= 1")
        chat = build_chat(
            opts.generator, cache, opts.base_url, opts.api_key_env, opts.max_new_tokens
        )
        return LLMSource(chat, opts.per_request, opts.max_requests)
    raise UserError(
        f"unknown generator '{shorten(opts.generator, 60)}'.{did_you_mean(kind, ['templates', 'llm'])} "
        "Available: templates, llm:MODEL"
    )


def _judge_ref(opts: BuildOptions) -> str:
    """The judge `--judge` names (`auto` resolved), checked: an unknown one and a negative
    `--judge-margin` are UserErrors, raised before any generator or judge model loads."""
    ref = opts.judge
    if ref == "auto":
        ref = opts.generator if opts.generator.startswith("llm:") else "embed"
    known = ref in ("embed", "none", "guards") or ref.startswith(("guards:", "llm:"))
    if not known:
        raise UserError(
            f"unknown judge '{shorten(ref, 60)}'.{did_you_mean(ref, list(JUDGES))} Available: {', '.join(JUDGES)}"
        )
    if not opts.judge_margin >= 0.0:  # also NaN: a negative margin makes both labels true
        raise UserError(
            f"--judge-margin must be >= 0 (the gap between the disallowed and allowed "
            f"similarity a label needs), got {opts.judge_margin}"
        )
    return ref


def _judge(ref: str, opts: BuildOptions, cache: AnswerCache) -> Judge:
    if ref == "embed":
        return EmbedJudge(opts.judge_margin)
    if ref == "none":
        return NoJudge()
    if ref == "guards" or ref.startswith("guards:"):
        names = ref.partition(":")[2]
        return GuardsJudge(tuple(names.split("+")) if names else SHIPPED_GUARDS)
    from .llm import LLMJudge, build_chat

    return LLMJudge(build_chat(ref, cache, opts.base_url, opts.api_key_env, opts.max_new_tokens))


class _Steps:
    """The filters one candidate group passes, in order, counting what each drops."""

    def __init__(
        self, category: CategoryPolicy, threshold: float, judge: Judge, boundary: Boundary | None
    ) -> None:
        self.category, self.judge, self.boundary = category, judge, boundary
        self.dedup = Deduper(threshold)
        self.counts: Counter[str] = Counter()

    def __call__(self, chunk: list[Candidate], vecs: Any = None) -> list[Candidate]:
        """What of `chunk` passes every step (`vecs`: its vectors, when already encoded)."""
        self.counts["generated"] += len(chunk)
        flags = self.dedup.keep([c.text for c in chunk], vecs)
        self.counts["near_duplicate"] += flags.count(False)
        kept = policy_filter(
            self.judge,
            self.category,
            [c for c, f in zip(chunk, flags, strict=True) if f],
            self.counts,
        )
        if self.boundary is not None and kept and kept[0].label == "benign":
            kept = self.boundary.keep(kept, self.counts)
        return kept


def _category(
    category: CategoryPolicy,
    source: Source,
    judge: Judge,
    boundary: Boundary | None,
    threshold: float,
    progress: bool,
) -> tuple[list[tuple[Candidate, Candidate | None]], dict[str, Counter[str]]]:
    """Kept (look-alike, twin or None) pairs of one category, and the counts of each side."""
    bar = tqdm(
        total=category.benign + category.unsafe,
        desc=f"make-suite {category.name}",
        unit="prompt",
        disable=not progress,
        dynamic_ncols=True,
    )
    benign_steps = _Steps(category, threshold, judge, boundary)
    twin_steps = _Steps(category, threshold, judge, None)  # boundary sampling is for look-alikes
    kept: list[Candidate] = []
    twins: dict[int, Candidate] = {}
    with bar:
        if category.benign:
            for batch in source.benign(category):
                vecs, start = benign_steps.dedup.encode([c.text for c in batch]), 0
                while start < len(batch) and len(kept) < category.benign:
                    end = start + category.benign - len(kept)
                    got = benign_steps(batch[start:end], vecs[start:end])
                    kept += got
                    bar.update(len(got))
                    start = end
                if len(kept) >= category.benign:
                    break
        for i, b in enumerate(kept):
            if len(twins) >= category.unsafe:
                break
            twin = source.twin(category, b)
            if twin is None:  # counted by the source as unusable
                continue
            if twin_steps([twin]):
                twins[i] = twin
                bar.update(1)
    for steps, side in ((benign_steps, "benign"), (twin_steps, "unsafe")):
        unusable = sum(
            n for k, n in source.unusable.items() if k.startswith(f"{category.name}:{side}:")
        )
        steps.counts["unusable"] += unusable
        steps.counts["generated"] += unusable  # made, then found to be no prompt
    benign_steps.counts["kept"], twin_steps.counts["kept"] = len(kept), len(twins)
    return [(b, twins.get(i)) for i, b in enumerate(kept)], {
        "benign": benign_steps.counts,
        "unsafe": twin_steps.counts,
    }


def _rows(pairs: list[tuple[Candidate, Candidate | None]], generator: str) -> list[dict[str, Any]]:
    """Suite rows (`suites.load_suite` reads them): a twin shares its look-alike's pair_id."""
    rows = []
    for b, t in pairs:
        pair_id = content_id(b.text, t.text, b.category) if t is not None else None
        for c in (b, t):
            if c is None:
                continue
            row: dict[str, Any] = {
                "id": content_id(c.text, c.category, c.label),
                "prompt": c.text,
                "category": c.category,
                "label": c.label,
            }
            if pair_id:
                row["pair_id"] = pair_id
            row["generator"] = generator
            row["origin"] = c.origin
            rows.append(row)
    return rows


def build(opts: BuildOptions) -> BuildResult:
    """Build the suite the policy asks for; write SUITE.jsonl, SUITE.card.json, SUITE.card.md.

    Raises `base.Outage` when a model or system did not answer (no suite is written; rerun to
    resume) and UserError for bad input, before any model is asked anything."""
    out = _out_path(opts.out)
    policy: Policy = load_policy(opts.policy)
    if opts.dedup_threshold is not None and not 0.0 < opts.dedup_threshold <= 1.0:
        raise UserError(f"--dedup-threshold must be in (0, 1], got {opts.dedup_threshold}")
    judge_ref = _judge_ref(opts)
    cache = AnswerCache(out.with_name(out.name + ".work"))
    judge = _judge(judge_ref, opts, cache)  # before the source: an llm: generator loads a model
    source = _source(opts, cache)
    source.check([c.name for c in policy.categories])  # before any model is asked anything
    boundary = (
        Boundary(opts.target, opts.keep_refused_at_least, opts.seeds, cache)
        if opts.target
        else None
    )
    threshold = opts.dedup_threshold if opts.dedup_threshold is not None else source.dedup_threshold
    rows: list[dict[str, Any]] = []
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for category in policy.categories:
        pairs, by_label = _category(category, source, judge, boundary, threshold, opts.progress)
        rows += _rows(pairs, source.kind)
        targets = {"benign": category.benign, "unsafe": category.unsafe}
        counts[category.name] = {
            label: {"target": targets[label], **{step: c[step] for step in STEPS}}
            for label, c in by_label.items()
        }
    if not rows:
        raise UserError(
            f"{policy.path}: no prompt survived the steps; see the counts with -v, or lower the filters"
        )
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(out, payload.encode("utf-8"))
    from ..suites import load_suite

    suite = load_suite(str(out))  # what `run` will read: fails here, not there
    card = make_card(
        suite={
            "file": out.name,
            "digest": suite.digest,
            "n_prompts": len(suite),
            "n_benign": sum(p.label == "benign" for p in suite.prompts),
            "n_unsafe": sum(p.label == "unsafe" for p in suite.prompts),
            "n_pairs": len({p.pair_id for p in suite.prompts if p.pair_id}),
        },
        policy={
            "file": str(policy.path),
            "name": policy.name,
            "version": policy.version,
            "digest": policy.digest,
        },
        generator={**source.spec, "twins": source.twins},
        dedup={
            "model": "minilm (all-MiniLM-L6-v2)",
            "threshold": threshold,
            "rule": f"a candidate whose cosine to one already kept (same category and label) is >= "
            f"{threshold} is dropped (default for {source.kind.partition(':')[0]}: {source.dedup_threshold}, OVERT's)",
        },
        judge=judge.spec,
        target=boundary.spec if boundary else None,
        counts=counts,
    )
    write_card(*card_paths(out), card)
    return BuildResult(out, card, cache.asked)
