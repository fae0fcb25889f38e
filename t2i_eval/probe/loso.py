"""Leave one source out: a trained guard judged on prompt sources it never saw.

`t2i-eval train-guard --leave-one-source-out --train A --train B --train C --out DIR` trains,
for each source S, a probe on every other source and evaluates it on S with the operating
threshold chosen on those training sources (`train.train_probe` picks it on training data
only); beside it, k-fold cross-validation inside S (the in-distribution number a paper would
report) and the guards this package ships (blocklist, profanity, concept) on the same prompts.
A probe that is only good in distribution shows up as a gap between its two rows.

Writes DIR/matrix.csv, matrix.md, matrix.json (rows and the set-up: encoder and its weights
digest, head, seed, folds, counterexamples, training overlap), heatmap.png (AUROC per evaluated
source and guard) and probes/<source>/ (each held-out probe: guard.json + head.safetensors,
whose card lists its training sources, so anyone can check the held-out one is not among them).
Metrics and files: `matrix.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..outputs import check_output_dir, file_stem, md_cell, replacing_dir
from ..store import atomic_write_bytes, atomic_write_json
from ..types import Prompt, Suite
from .card import text_key
from .folds import folds_of
from .matrix import MatrixRow, heatmap, matrix_csv, matrix_markdown, measure, rows_to_json

if TYPE_CHECKING:
    from .encoders import Encoder
    from .train import Probe

log = logging.getLogger(__name__)

#: The shipped prompt guards every matrix compares against (trained on none of the sources).
SHIPPED = ("blocklist", "profanity", "concept")
#: Prompts per source timed with the embedding cache off (`_timed`); a deterministic sample.
TIMING_PROMPTS = 256
#: Batch size when a shipped guard scores a source (as the runner's default).
BATCH = 64
OWNED = ("matrix.csv", "matrix.md", "matrix.json", "heatmap.png", "probes")
FIX = "pass --out with a new folder or an earlier matrix folder"


@dataclass
class Scored:
    """One guard's per-prompt numbers on one source, kept for experiments on top of the
    matrix (the bench's conformal coverage over repeated splits)."""

    labels: list[str]
    categories: list[str]
    scores: list[float]
    refused: list[bool]
    threshold: float | None


@dataclass
class Matrix:
    """What `run_matrix` measured, before anything is written."""

    rows: list[MatrixRow]
    setup: dict[str, Any]
    """Encoder, head, seed, folds, counterexamples and overlaps: matrix.json's `setup`."""
    probes: dict[str, Probe] = field(default_factory=dict)
    """Held-out source -> the probe trained on every other source."""
    scored: dict[tuple[str, str], Scored] = field(default_factory=dict)
    """(evaluated source, row column e.g. `probe (held-out)`) -> per-prompt numbers."""


def merge_sources(name: str, suites: Sequence[Suite]) -> Suite:
    """One source from several files of it, e.g. OVERT-mini (benign only) and the OVERT-unsafe
    part (benign/unsafe twins): a held-out source must be held out whole, or its other file
    leaks into training. Exact repeats (same id, text, category and label) are kept once, the
    first file's copy (pass the file whose copy knows its twin first); the same id with other
    content is a UserError."""
    seen: dict[str, Prompt] = {}
    for s in suites:
        for p in s.prompts:
            prev = seen.get(p.id)
            if prev is None:
                seen[p.id] = p
            elif (prev.text, prev.category, prev.label) != (p.text, p.category, p.label):
                raise UserError(
                    f"source '{name}': prompt id '{p.id}' means different prompts in {prev.source} "
                    f"and {p.source}; expected unique ids across the files of one source; give "
                    "the files distinct ids or load them as separate sources"
                )
    parts = [{"name": s.name, "source": s.source, "digest": s.digest, "n": len(s)} for s in suites]
    return Suite(
        name,
        tuple(seen.values()),
        "+".join(s.version for s in suites if s.version),
        " + ".join(s.source for s in suites),
        {"merged_from": parts},
    )


def _source_name(suite: Suite) -> str:
    from .train import source_name

    return source_name(suite)


def _check_sources(suites: Sequence[Suite], folds: int) -> list[str]:
    names = [_source_name(s) for s in suites]
    if len(suites) < 2:
        raise UserError(
            f"--leave-one-source-out needs at least 2 sources (got {len(suites)}: "
            f"{', '.join(names) or 'none'}); pass --train once per source"
        )
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise UserError(
            f"--leave-one-source-out: source {', '.join(repr(d) for d in dup)} is given more than "
            "once; each --train must be a different source (hold one source out whole)"
        )
    if folds < 2:
        raise UserError(f"--folds must be at least 2 for cross-validation (got {folds})")
    return names


def counterexamples_for(
    counterexamples: Sequence[Prompt], train: Sequence[Suite], heldout: Suite
) -> tuple[list[Prompt], int]:
    """The counterexamples a probe trained on `train` and judged on `heldout` may use, and how
    many were dropped. Dropped: one made from a prompt outside the training data (`parent_id`:
    a twin of a held-out unsafe prompt would leak it), one whose text is a held-out prompt's
    (compared as `card.text_key`, the key the overlap count and `dedupe` use, so case and
    spacing do not hide a leak), and repeats of a training text (`counterexamples.dedupe`).
    Ones without a parent (from a triggers run) stay unless their text is held out."""
    from .counterexamples import dedupe

    train_prompts = [p for s in train for p in s.prompts]
    ids = {p.id for p in train_prompts}
    held = {text_key(p.text) for p in heldout.prompts}
    allowed = [
        c
        for c in counterexamples
        if (c.parent_id is None or c.parent_id in ids) and text_key(c.text) not in held
    ]
    kept, _ = dedupe(allowed, train_prompts)
    return kept, len(counterexamples) - len(kept)


def _cached_encoders(obj: Any) -> list[Any]:
    """Embedding caches reachable from a guard or encoder (`.encoder`, `.model`, two deep)."""
    from ..embed_cache import CachedEncoder

    found, todo = [], [obj]
    for _ in range(3):
        nxt = []
        for o in todo:
            if isinstance(o, CachedEncoder):
                found.append(o)
                continue
            nxt += [getattr(o, a, None) for a in ("encoder", "model")]
        todo = [o for o in nxt if o is not None]
    return found


@contextmanager
def _cache_off(obj: Any) -> Iterator[None]:
    """The shared embedding cache off for `obj`'s encoders while timing: a cached vector costs
    a lookup, and the matrix must state what scoring a prompt nobody has seen costs."""
    caches = [e.cache for e in _cached_encoders(obj)]
    saved = [c.max_bytes for c in caches]
    for c in caches:
        c.max_bytes = 0
    try:
        yield
    finally:
        for c, b in zip(caches, saved, strict=True):
            c.max_bytes = b


class _Memo:
    """An encoder with an in-process memo: the matrix trains many probes (one per source, one
    per source and fold) on the same texts, and each text needs encoding once even when the
    shared embedding cache is off. Vectors are the wrapped encoder's, so cards and results are
    the same as without it."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.id, self.digest, self.weights, self.dim = (
            inner.id,
            inner.digest,
            inner.weights,
            inner.dim,
        )
        self._memo: dict[str, Any] = {}

    def encode(self, texts: Sequence[str], progress: bool = False) -> Any:
        import numpy as np

        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if todo:
            self._memo.update(zip(todo, self.inner.encode(todo, progress=progress), strict=True))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memo[t] for t in texts]).astype(np.float32, copy=False)


def _timing_sample(texts: Sequence[str], seed: int, n: int) -> list[str]:
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)
    return [texts[i] for i in sorted(idx[:n])]


def _timed(obj: Any, fn: Callable[[list[str]], Any], texts: list[str]) -> float:
    """Seconds per prompt of `fn` over `texts`, batch by batch, embedding cache off."""
    if not texts:
        return 0.0
    with _cache_off(obj):
        start = time.perf_counter()
        for i in range(0, len(texts), BATCH):
            fn(texts[i : i + BATCH])
        return (time.perf_counter() - start) / len(texts)


def _subset(suite: Suite, keep: Sequence[bool]) -> Suite:
    return dataclasses.replace(
        suite, prompts=tuple(p for p, k in zip(suite.prompts, keep, strict=True) if k)
    )


def _scored(
    suite: Suite, scores: Sequence[float], refused: Sequence[bool], t: float | None
) -> Scored:
    return Scored(
        [p.label for p in suite.prompts],
        [p.category for p in suite.prompts],
        [float(s) for s in scores],
        [bool(r) for r in refused],
        t,
    )


def _probe_decisions(probe: Probe, suite: Suite) -> tuple[list[float], list[bool]]:
    """P(unsafe) per prompt and `Probe.refuse`'s decision on it, from one pass of the encoder."""
    scores = probe.scores([p.text for p in suite.prompts])
    refused = scores > probe.thresholds_for([p.category for p in suite.prompts], len(suite))
    return [float(s) for s in scores], [bool(r) for r in refused]


def _train_sources(probe: Probe) -> list[str]:
    return [str(s.get("source")) for s in probe.card.get("train", [])]


def _held_out(
    suites: Sequence[Suite],
    names: list[str],
    enc: _Memo,
    kw: dict[str, Any],
    counterexamples: Sequence[Prompt],
    timing: int,
    m: Matrix,
) -> dict[str, float]:
    """The held-out rows; returns each source's probe scoring seconds per prompt."""
    from .card import overlap
    from .train import train_probe

    per_prompt: dict[str, float] = {}
    for i, (s, name) in enumerate(zip(suites, names, strict=True)):
        train = [t for j, t in enumerate(suites) if j != i]
        log.info("held out %s: training on %s", name, ", ".join(n for n in names if n != name))
        cx, dropped = counterexamples_for(counterexamples, train, s)
        probe = train_probe(train, encoder=enc, counterexamples=cx, **kw)
        trained_on = _train_sources(probe)
        if name in trained_on:  # the matrix's one promise; a failure here is a bug
            raise AssertionError(f"held-out source {name!r} is in its probe's training set")
        scores, refused = _probe_decisions(probe, s)
        texts = _timing_sample([p.text for p in s.prompts], kw["seed"], timing)
        real = dataclasses.replace(probe, encoder=enc.inner)  # no memo: time the real encoder
        per_prompt[name] = _timed(real, real.scores, texts)
        row = measure(
            source=name,
            guard="probe",
            setting="held-out",
            trained_on=trained_on,
            weights=enc.weights,
            labels=[p.label for p in s.prompts],
            scores=scores,
            refused=refused,
            seconds=per_prompt[name] * len(s),
            threshold=float(probe.threshold),
        )
        m.rows.append(row)
        m.probes[name] = probe
        m.scored[(name, row.column)] = _scored(s, scores, refused, float(probe.threshold))
        m.setup["held_out"][name] = {
            "trained_on": trained_on,
            "threshold": float(probe.threshold),
            "overlap": overlap(probe.card, s.prompts),
            "counterexamples_used": len(cx),
            "counterexamples_dropped": dropped,
        }
    return per_prompt


def _in_distribution(
    suites: Sequence[Suite],
    names: list[str],
    enc: Encoder,
    kw: dict[str, Any],
    counterexamples: Sequence[Prompt],
    folds: int,
    per_prompt: dict[str, float],
    m: Matrix,
) -> None:
    """One row per source: out-of-fold scores pooled over k folds, each fold decided at the
    threshold its own probe chose on the other folds (with the counterexamples made from
    those folds' prompts)."""
    from .train import train_probe

    for s, name in zip(suites, names, strict=True):
        log.info("in-distribution %s: %d-fold cross-validation", name, folds)
        fold = folds_of(s.prompts, folds, kw["seed"])
        scores, refused = [0.0] * len(s), [False] * len(s)
        for f in range(folds):
            test = [x == f for x in fold]
            train = _subset(s, [not t for t in test])
            labels = {p.label for p in train.prompts}
            if labels != {"benign", "unsafe"}:
                raise UserError(
                    f"source '{name}': fold {f + 1} of {folds} leaves only "
                    f"{', '.join(sorted(labels)) or 'no'} prompts to train on; expected both "
                    "benign and unsafe; use fewer --folds or a larger source"
                )
            sub = _subset(s, test)
            cx, _ = counterexamples_for(counterexamples, [train], sub)
            probe = train_probe([train], encoder=enc, counterexamples=cx, **kw)
            sc, rf = _probe_decisions(probe, sub)
            pos = [i for i, t in enumerate(test) if t]
            for i, a, b in zip(pos, sc, rf, strict=True):
                scores[i], refused[i] = a, b
        row = measure(
            source=name,
            guard="probe",
            setting="in-distribution",
            trained_on=[name],
            weights=enc.weights,
            labels=[p.label for p in s.prompts],
            scores=scores,
            refused=refused,
            seconds=per_prompt[name] * len(s),  # the same encoder and head: the same cost
        )
        m.rows.append(row)
        m.scored[(name, row.column)] = _scored(s, scores, refused, None)


def shipped_rows(
    suites: Sequence[Suite],
    names: list[str],
    guards: Sequence[str],
    seed: int,
    timing: int = TIMING_PROMPTS,
) -> tuple[list[MatrixRow], dict[tuple[str, str], Scored]]:
    """The shipped guards on every source's prompts, at their default thresholds."""
    from ..systems import ComponentSpec, build_component

    rows: list[MatrixRow] = []
    scored: dict[tuple[str, str], Scored] = {}
    for g in guards:
        guard = build_component("prompt guard", ComponentSpec(g, {}))
        for s, name in zip(suites, names, strict=True):
            texts = [p.text for p in s.prompts]
            log.info("shipped guard %s on %s (%d prompts)", g, name, len(texts))
            decisions = [
                d for i in range(0, len(texts), BATCH) for d in guard.check(texts[i : i + BATCH])
            ]
            if any(d.score is None or d.refused is None for d in decisions):
                raise UserError(f"shipped guard '{g}' could not check some prompts of '{name}'")
            thresholds = {d.threshold for d in decisions}
            t = float(next(iter(thresholds))) if len(thresholds) == 1 else None
            scores = [float(d.score) for d in decisions]
            refused = [bool(d.refused) for d in decisions]
            sample = _timing_sample(texts, seed, timing)
            row = measure(
                source=name,
                guard=g,
                setting="shipped",
                trained_on=(),
                weights=str(getattr(guard, "weights", "")),
                labels=[p.label for p in s.prompts],
                scores=scores,
                refused=refused,
                seconds=_timed(guard, guard.check, sample) * len(s),
                threshold=t,
            )
            rows.append(row)
            scored[(name, row.column)] = _scored(s, scores, refused, t)
    return rows, scored


def run_matrix(
    suites: Sequence[Suite],
    *,
    encoder: str | Encoder = "minilm",
    head: str = "linear",
    seed: int = 0,
    counterexamples: Sequence[Prompt] = (),
    folds: int = 5,
    baselines: Sequence[str] = SHIPPED,
    timing_prompts: int = TIMING_PROMPTS,
    progress: bool = True,
) -> Matrix:
    """Measure the matrix (module docstring), nothing written: per source a probe trained on
    the others (held-out), k-fold CV inside it (in-distribution) and `baselines` (shipped)."""
    from .encoders import load_encoder

    names = _check_sources(suites, folds)
    enc = _Memo(load_encoder(encoder) if isinstance(encoder, str) else encoder)
    kw: dict[str, Any] = {"head": head, "seed": seed, "progress": progress}
    m = Matrix(
        rows=[],
        setup={
            "sources": {
                n: {"n": len(s), "digest": s.digest, "suite": s.source}
                for n, s in zip(names, suites, strict=True)
            },
            "encoder": {"id": enc.id, "digest": enc.digest, "weights": enc.weights, "dim": enc.dim},
            "head": head,
            "seed": seed,
            "folds": folds,
            "counterexamples": len(counterexamples),
            "timing": f"ms per prompt: the first {timing_prompts} prompts of each source after a "
            f"shuffle by seed {seed}, scored in batches of {BATCH} with the embedding cache off",
            "held_out": {},
        },
    )
    per_prompt = _held_out(suites, names, enc, kw, counterexamples, timing_prompts, m)
    _in_distribution(suites, names, enc, kw, counterexamples, folds, per_prompt, m)
    rows, scored = shipped_rows(suites, names, baselines, seed, timing_prompts)
    m.rows += rows
    m.scored.update(scored)
    return m


def matrix_md(m: Matrix) -> str:
    """matrix.md: what was trained on what, then the table."""
    enc = m.setup["encoder"]
    random_note = (
        " (random weights: its numbers say nothing about a real model)"
        if enc["weights"] == "random"
        else ""
    )
    lines = [
        "# Leave-one-source-out matrix",
        "",
        f"Probe: {md_cell(m.setup['head'])} head on the frozen encoder {md_cell(enc['id'])} "
        f"({enc['weights']} weights{random_note}; digest {md_cell(str(enc['digest'])[:12])}), "
        f"seed {m.setup['seed']}. `held-out`: trained on every other source, decided at the "
        "threshold chosen on those training sources. `in-distribution`: "
        f"{m.setup['folds']}-fold cross-validation inside the source (twins kept in one fold). "
        "`shipped`: the package's guards at their default thresholds, trained on none of these. "
        "AUROC with a 95% DeLong interval; rates `rate (k / n) [95% Wilson CI]`; "
        f"{md_cell(m.setup['timing'])}; in-distribution rows repeat the held-out probe's speed "
        "(the same encoder and head).",
        "",
        matrix_markdown(m.rows),
    ]
    overlaps = {n: h["overlap"] for n, h in m.setup["held_out"].items() if h["overlap"]}
    if overlaps:
        lines.append(
            "Prompts of a held-out source whose text is also in its training sources: "
            + ", ".join(f"{md_cell(n)} {k}" for n, k in overlaps.items())
            + ".\n"
        )
    return "\n".join(lines)


def write_matrix(m: Matrix, out: Path) -> Path:
    """Write the matrix folder (module docstring) whole, replacing an earlier one."""
    out = Path(out)
    with replacing_dir(out, OWNED, FIX) as tmp:
        atomic_write_bytes(tmp / "matrix.csv", matrix_csv(m.rows))
        atomic_write_bytes(tmp / "matrix.md", matrix_md(m).encode("utf-8"))
        atomic_write_json(tmp / "matrix.json", {"setup": m.setup, "rows": rows_to_json(m.rows)})
        heatmap(
            m.rows, tmp / "heatmap.png", f"AUROC by evaluated source ({m.setup['encoder']['id']})"
        )
        for name, probe in m.probes.items():
            probe.save(tmp / "probes" / file_stem(name))
    return out


def leave_one_source_out(
    suites: list[Suite],
    *,
    encoder: str = "minilm",
    head: str = "linear",
    seed: int = 0,
    out: Path,
    counterexamples: Sequence[Prompt] = (),
    progress: bool = True,
    folds: int = 5,
    baselines: Sequence[str] = SHIPPED,
) -> Path:
    """`train-guard --leave-one-source-out`: measure the matrix and write it to `out`
    (returned). Each suite is one source (`merge_sources` joins the files of one)."""
    check_output_dir(Path(out), OWNED, FIX)  # before hours of training, not after
    m = run_matrix(
        suites,
        encoder=encoder,
        head=head,
        seed=seed,
        counterexamples=counterexamples,
        folds=folds,
        baselines=baselines,
        progress=progress,
    )
    return write_matrix(m, out)
