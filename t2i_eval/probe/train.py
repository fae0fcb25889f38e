"""Train a probe (a small head on a frozen encoder) on labelled suites, pick its threshold on the
training data only, and save or load it as a folder (`guard.json` card + `head.safetensors`).

The operating threshold comes from out-of-fold scores of the training data (k-fold, stratified,
seeded, twins and counterexamples in their parent's fold: `folds.folds_of`): in-sample scores of a fitted head are over-confident, so a threshold set on them would
refuse fewer unsafe prompts than promised on any new prompt. Nothing outside the training suites
is looked at. The same folds give the card's cross-validated metrics.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import UserError
from ..store import atomic_write_bytes, atomic_write_json
from ..sweep import auroc, auroc_ci, fpr_at_tpr
from ..systems.fast_encoder import DEFAULT_BACKEND
from ..types import Prompt, Suite
from . import heads
from .card import CARD, CARD_VERSION, HEAD, KIND, read_card, text_key
from .encoders import Encoder, load_encoder
from .folds import folds_of, label_groups

if TYPE_CHECKING:
    import numpy as np

#: The default operating point: refuse this share of the training set's unsafe prompts.
DEFAULT_TARGET = 0.9


def source_name(suite: Suite) -> str:
    """The name a training source goes by in cards and reports: the suite's own name."""
    return suite.name


@dataclass
class Probe:
    """A trained prompt guard: encoder + head, its threshold(s) and its card."""

    encoder: Encoder
    """The frozen encoder the head reads."""
    head: Any
    """The torch head (`heads.build_head`)."""
    threshold: float
    """Refuse when P(unsafe) > threshold."""
    category_thresholds: dict[str, float] = field(default_factory=dict)
    """Per category (chosen on that category's training prompts); others use `threshold`."""
    card: dict[str, Any] = field(default_factory=dict)
    """What guard.json says: sources, digests, counts, seed, metrics."""
    head_sha256: str | None = None
    """sha256 of the head file this probe was loaded from (None before it is saved): a run
    records it, so a report can tell when the folder was retrained since."""

    def scores(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """P(unsafe) per text, float64 in [0, 1]."""
        return heads.predict(self.head, self.encoder.encode(list(texts), progress=progress))

    def thresholds_for(self, categories: Sequence[str] | None, n: int) -> np.ndarray:
        """The threshold that applies to each of n items (per category when known)."""
        import numpy as np

        if categories is None or not self.category_thresholds:
            return np.full(n, self.threshold)
        return np.array([self.category_thresholds.get(c, self.threshold) for c in categories])

    def refuse(self, texts: Sequence[str], categories: Sequence[str] | None = None) -> np.ndarray:
        """score > threshold, per category if the probe has category thresholds and they are given."""
        return self.scores(texts) > self.thresholds_for(categories, len(texts))

    def save(self, out: Path) -> None:
        """Write `out/head.safetensors`, then `out/guard.json` (with the head's sha256)."""
        from safetensors.torch import save

        out = Path(out)
        data = save({k: v.contiguous() for k, v in self.head.state_dict().items()})
        atomic_write_bytes(out / HEAD, data)
        self.head_sha256 = self.card["head"]["sha256"] = hashlib.sha256(data).hexdigest()
        atomic_write_json(out / CARD, self.card)


def load_probe(path: str | Path, backend: str = DEFAULT_BACKEND) -> Probe:
    """The probe saved in folder `path`, its encoder run on `backend` (`load_encoder`; the card's
    weights digest is checked whatever the backend); a missing, corrupt or inconsistent card
    (`read_card` checks its entries), a head that disagrees with it, or an encoder whose weights
    changed since training is a one-line UserError. The head is checked before the encoder
    loads, so a bad folder fails fast."""
    folder = Path(path)
    card = read_card(folder)
    spec = card["head"]
    kind, dim, shapes = spec["kind"], card["encoder"]["dim"], spec["shapes"]
    threshold = float(card["threshold"]["value"])
    per_cat = {str(k): float(v) for k, v in (card.get("category_thresholds") or {}).items()}
    head_path = folder / HEAD
    if not head_path.is_file():
        raise UserError(f"probe guard: {head_path} not found; retrain with t2i-eval train-guard")
    head = heads.load_head(kind, dim, head_path, shapes)
    digest = hashlib.sha256(head_path.read_bytes()).hexdigest()
    if spec.get("sha256") and digest != spec["sha256"]:
        raise UserError(
            f"probe guard: {head_path} changed since training (sha256 {digest[:12]}, card says "
            f"{str(spec['sha256'])[:12]}); retrain with t2i-eval train-guard"
        )
    encoder = load_encoder(card["encoder"]["id"], backend)
    if encoder.digest != card["encoder"]["digest"]:
        raise UserError(
            f"probe guard: encoder {card['encoder']['id']} has other weights now (digest "
            f"{encoder.digest[:12]}) than at training ({str(card['encoder']['digest'])[:12]}); "
            "the head would read vectors it never saw: retrain with t2i-eval train-guard"
        )
    if encoder.dim != dim:
        raise UserError(
            f"probe guard: encoder {card['encoder']['id']} gives {encoder.dim}-long vectors, "
            f"{folder / CARD} says encoder.dim {dim}; retrain with t2i-eval train-guard"
        )
    return Probe(encoder, head, threshold, per_cat, card, digest)


def pick_threshold(
    scores: np.ndarray,
    unsafe: np.ndarray,
    target_unsafe_refusal: float | None = None,
    max_overrefusal: float | None = None,
) -> float | None:
    """The operating threshold t (refuse when score > t) on these scores.

    With `max_overrefusal` m: the lowest t at which at most a share m of the benign prompts are
    refused (refuse as much unsafe as that budget allows). Otherwise the highest t at which at
    least `target_unsafe_refusal` (default 0.9) of the unsafe prompts are refused (as little
    over-refusal as that target allows). Candidates are 0 and the scores themselves. None when
    the class the rule needs is absent."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    unsafe = np.asarray(unsafe, dtype=bool)
    cands = np.unique(np.concatenate([[0.0], scores]))
    if max_overrefusal is not None:
        benign = np.sort(scores[~unsafe])
        if not len(benign):
            return None
        above = len(benign) - np.searchsorted(benign, cands, side="right")
        ok = np.flatnonzero(above <= max_overrefusal * len(benign) + 1e-9)
        return float(cands[ok[0]])
    target = DEFAULT_TARGET if target_unsafe_refusal is None else target_unsafe_refusal
    pos = np.sort(scores[unsafe])
    if not len(pos):
        return None
    above = len(pos) - np.searchsorted(pos, cands, side="right")
    ok = np.flatnonzero(above >= math.ceil(target * len(pos) - 1e-9))
    return float(cands[ok[-1]]) if len(ok) else 0.0


def _rates(scores: np.ndarray, unsafe: np.ndarray, t: np.ndarray | float) -> dict[str, Any]:
    import numpy as np

    refused = np.asarray(scores) > t
    b, u = ~unsafe, unsafe
    return {
        "benign_refused": int((refused & b).sum()),
        "benign_n": int(b.sum()),
        "unsafe_refused": int((refused & u).sum()),
        "unsafe_n": int(u.sum()),
    }


def _metrics(scores: np.ndarray, unsafe: np.ndarray, t: np.ndarray | float) -> dict[str, Any]:
    neg, pos = scores[~unsafe].tolist(), scores[unsafe].tolist()
    a = auroc(neg, pos)
    lo, hi = auroc_ci(a, len(neg), len(pos))
    fpr, _ = fpr_at_tpr(neg, pos)

    def num(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 4)

    return {
        "auroc": num(a),
        "auroc_ci": [num(lo), num(hi)],
        "fpr_at_95_tpr": num(fpr),
        "at_threshold": _rates(scores, unsafe, t),
    }


def _rows(
    train: Sequence[Suite], counterexamples: Sequence[Prompt]
) -> tuple[list[Prompt], list[str]]:
    """Every training prompt with the name of the source it came from."""
    prompts, sources = [], []
    for suite in train:
        prompts += suite.prompts
        sources += [source_name(suite)] * len(suite.prompts)
    prompts += counterexamples
    sources += ["counterexamples"] * len(counterexamples)
    return prompts, sources


def _suite_entry(suite: Suite) -> dict[str, Any]:
    labels = Counter(p.label for p in suite.prompts)
    cats: dict[str, dict[str, int]] = {}
    for p in suite.prompts:
        cats.setdefault(p.category, {"benign": 0, "unsafe": 0})[p.label] += 1
    return {
        "source": source_name(suite),
        "path": suite.source,
        "version": suite.version,
        "digest": suite.digest,
        "n": len(suite.prompts),
        "benign": labels["benign"],
        "unsafe": labels["unsafe"],
        "categories": dict(sorted(cats.items())),
    }


def train_probe(
    train: Sequence[Suite],
    *,
    encoder: str | Encoder = "minilm",
    head: str = "linear",
    seed: int = 0,
    counterexamples: Sequence[Prompt] = (),
    target_unsafe_refusal: float | None = None,
    max_overrefusal: float | None = None,
    per_category: bool = False,
    cv_folds: int = 5,
    progress: bool = False,
) -> Probe:
    """Train a probe on `train` (each suite one source) plus `counterexamples` (extra prompts,
    normally benign hard negatives), see the module docstring. Deterministic for a seed."""
    import numpy as np

    if head not in heads.HEADS:
        raise UserError(f"unknown head {head!r}; expected one of {', '.join(heads.HEADS)}")
    for name, v in (
        ("target unsafe refusal", target_unsafe_refusal),
        ("max over-refusal", max_overrefusal),
    ):
        if v is not None and not 0 <= v <= 1:
            raise UserError(f"{name} must be between 0 and 1, found {v}")
    if target_unsafe_refusal is not None and max_overrefusal is not None:
        raise UserError("give a target unsafe refusal or a max over-refusal, not both")
    prompts, sources = _rows(train, counterexamples)
    unsafe = np.array([p.label == "unsafe" for p in prompts], dtype=bool)
    if not unsafe.any() or unsafe.all():
        have = "unsafe" if len(prompts) and unsafe.all() else "benign"
        names = ", ".join(source_name(s) for s in train) or "no suite"
        raise UserError(
            f"train-guard: the training data ({names}) has {have} prompts only "
            f"({len(prompts)} prompts); a guard needs both benign and unsafe examples: add a "
            "suite with the other label (--train SUITE)"
        )
    enc = load_encoder(encoder) if isinstance(encoder, str) else encoder
    x = enc.encode([p.text for p in prompts], progress=progress)
    categories = np.array([p.category for p in prompts])
    k = min(cv_folds, label_groups(prompts, "unsafe"), label_groups(prompts, "benign"))
    oof = None
    if k >= 2:
        fold = np.array(folds_of(prompts, k, seed))
        oof = np.empty(len(prompts), dtype=np.float64)
        from tqdm import tqdm

        for f in tqdm(range(k), desc="cross-validation", unit="fold", disable=not progress):
            held = fold == f
            oof[held] = heads.predict(heads.fit(head, x[~held], unsafe[~held], seed), x[held])
    final = heads.fit(head, x, unsafe, seed)
    basis = oof if oof is not None else heads.predict(final, x)
    rule = dict(target_unsafe_refusal=target_unsafe_refusal, max_overrefusal=max_overrefusal)
    # scores come rounded (`heads.DIGITS`), so is a threshold picked among them; rounding it
    # again states that on the card and keeps it so if the candidates ever change
    threshold = pick_threshold(basis, unsafe, **rule)
    assert threshold is not None  # both classes are present (checked above)
    threshold = round(threshold, heads.DIGITS)
    per_cat: dict[str, float] = {}
    if per_category:
        for cat in sorted(set(categories)):
            m = categories == cat
            t = pick_threshold(basis[m], unsafe[m], **rule)
            if t is not None:
                per_cat[str(cat)] = round(t, heads.DIGITS)
    applied = np.array([per_cat.get(c, threshold) for c in categories])
    cv: dict[str, Any] | None = None
    if oof is not None:
        cv = {
            "folds": k,
            "grouped": "twins (pair_id) and prompts made from another (parent_id) share a fold",
            "all": _metrics(oof, unsafe, applied),
            "per_source": {},
        }
        own = np.array([s != "counterexamples" for s in sources])
        cv["suites"] = _metrics(oof[own], unsafe[own], applied[own])  # counterexamples left out
        for name in dict.fromkeys(sources):
            m = np.array([s == name for s in sources])
            cv["per_source"][name] = _metrics(oof[m], unsafe[m], applied[m])
    if max_overrefusal is not None:
        rule_text = f"at most {max_overrefusal} benign over-refusal"
    else:
        target = DEFAULT_TARGET if target_unsafe_refusal is None else target_unsafe_refusal
        rule_text = f"target unsafe refusal {target}"
    card = {
        "kind": KIND,
        "card_version": CARD_VERSION,
        "t2i_eval": __version__,
        "encoder": {"id": enc.id, "digest": enc.digest, "weights": enc.weights, "dim": enc.dim},
        "head": {
            "kind": head,
            "shapes": heads.shapes(final),
            "l2": heads.L2,
            "iterations": heads.ITERATIONS,
            "class_weights": "balanced",
        },
        "train": [_suite_entry(s) for s in train],
        "counterexamples": {
            "added": len(counterexamples),
            "by_origin": dict(Counter(p.meta.get("origin", "given") for p in counterexamples)),
        },
        "seed": seed,
        "threshold": {
            "value": threshold,
            "rule": rule_text,
            "chosen_on": (
                f"out-of-fold scores of the training data ({k} folds)"
                if oof is not None
                else "in-sample scores of the training data (too few prompts for folds)"
            ),
            "train_rates": _rates(basis, unsafe, applied),
        },
        "category_thresholds": per_cat,
        "cv": cv,
        "train_text_sha256": sorted({text_key(p.text) for p in prompts}),
    }
    return Probe(enc, final, threshold, per_cat, card)


def counterexample_effect(with_ce: Probe, without: Probe) -> dict[str, Any]:
    """Out-of-fold metrics on the training suites alone (counterexamples left out), each probe
    at its own threshold: what adding the counterexamples changed where both can be compared."""

    def suites(p: Probe) -> dict[str, Any]:
        cv = p.card.get("cv") or {}
        return cv.get("suites") or {}

    return {"with": suites(with_ce), "without": suites(without)}


__all__ = [
    "counterexample_effect",
    "Probe",
    "load_probe",
    "pick_threshold",
    "source_name",
    "train_probe",
]
