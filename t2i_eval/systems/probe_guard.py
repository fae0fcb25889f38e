"""`probe`: a prompt guard trained here (`t2i-eval train-guard`), loaded from its folder.

`--system probe:DIR`, `probe:DIR>tiny`, or `{name: probe, path: DIR}` in a system spec. The
folder holds guard.json (the card: encoder, head, training sources, threshold) and
head.safetensors; see `t2i_eval/probe/`. `backend: onnx` (or `onnx-int8`) runs a
sentence-transformers encoder through ONNX Runtime, as the concept guard's option does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..probe.encoders import check_encoder_backend
from ..probe.heads import DIGITS
from ..types import StageDecision
from .fast_encoder import DEFAULT_BACKEND, check_backend
from .thresholds import check_file_option, file_info, read_thresholds, scalar_threshold


def decide(score: float, threshold: float) -> bool:
    """The probe's rule on stored numbers: refuse when P(unsafe) > threshold."""
    return score > threshold


def _folder(model: str | None, path: str | None) -> str:
    """The probe folder from either option (`probe:DIR` sets model; YAML may say path)."""
    if (model is None) == (path is None):
        raise UserError(
            "prompt guard 'probe': give the trained probe's folder once, as model (probe:DIR) or "
            "path ({name: probe, path: DIR}); train one with t2i-eval train-guard --out DIR"
        )
    return str(model if model is not None else path)


def _batch_size(value: Any) -> int:
    """`batch_size` checked: a whole number of prompts per encoder call, at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"prompt guard 'probe': batch_size must be a whole number >= 1, found "
            f"{type(value).__name__} {value!r:.40}; pass e.g. batch_size: 64"
        )
    return value


class ProbeGuard:
    """A linear or MLP head on a frozen encoder, trained by `t2i-eval train-guard`.

    The threshold is the one chosen on the training data (guard.json), unless `threshold` or
    `thresholds: FILE` (a sweep's calibrated one) overrides it. The card's per-category
    thresholds are recorded but not applied: at run time a guard sees the prompt only, not its
    category (sweep a run per category to use them).

    `backend`: `torch` (default), `onnx` or `onnx-int8` (`text_guards.load_sentence_model`, CPU
    only), for `minilm` and `st:` encoders; `clip-text:` runs on torch only. The head and its
    threshold were fitted on torch vectors: fp32 ONNX moves P(unsafe) by float32 rounding only,
    int8 moves the vectors enough to move scores and flip decisions near the threshold
    (docs/text_encoders.md measures it for the concept guard). The card's weights digest is
    checked on every backend; info() records the backend, so the manifest says which scored."""

    name = "probe"
    weights = "pretrained"

    def __init__(
        self,
        model: str | None = None,
        path: str | None = None,
        threshold: float | None = None,
        thresholds: str | None = None,
        batch_size: int = 64,
        backend: str = DEFAULT_BACKEND,
    ) -> None:
        from ..probe.train import load_probe

        self.batch_size = _batch_size(batch_size)  # before the encoder loads
        self.backend = check_backend(backend, "probe guard")
        self.path = Path(_folder(model, path)).resolve()
        self.probe = load_probe(self.path, self.backend)  # an encoder it cannot run: UserError
        self.card = self.probe.card
        # a random-weight encoder (clip-text:tiny) makes the guard's numbers meaningless
        self.weights = "random" if self.probe.encoder.weights == "random" else "pretrained"
        self.from_file = read_thresholds(thresholds, self.name) if thresholds else None
        given = self.probe.threshold if threshold is None else threshold
        self.threshold = scalar_threshold(self.from_file, given)

    @classmethod
    def listing(cls) -> str:
        """What `t2i-eval list` says it needs: a folder `train-guard` wrote."""
        return (
            "trained here: `t2i-eval train-guard --train SUITE --out DIR`, then `probe:DIR` "
            "(or {name: probe, path: DIR}); needs the encoder it was trained on"
        )

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """The folder's card is read when the spec is checked (cheap: JSON only), so a wrong
        folder, or a backend its encoder does not run on, is exit 2 before any run directory
        exists."""
        from ..probe.card import read_card

        folder = _folder(options.get("model"), options.get("path"))
        _batch_size(options.get("batch_size", 64))
        card = read_card(folder)
        backend = options.get("backend", DEFAULT_BACKEND)
        check_encoder_backend(str(card["encoder"]["id"]), backend, "probe guard")
        check_file_option(cls.name, options)

    def info(self) -> dict[str, Any]:
        from ..probe.card import sources_text

        card = self.card
        return {
            "model": str(self.path),
            "path": str(self.path),
            "trained_here": True,
            "encoder": card["encoder"]["id"],
            "encoder_digest": card["encoder"]["digest"],
            "encoder_weights": card["encoder"]["weights"],
            "backend": self.backend,
            "head": card["head"]["kind"],
            # of the file loaded (checked against the card): a report compares it with the
            # folder's card to tell whether the folder was retrained since this run
            "head_sha256": self.probe.head_sha256,
            "seed": card["seed"],
            "train_sources": [
                {k: s.get(k) for k in ("source", "path", "digest", "n", "benign", "unsafe")}
                for s in card["train"]
            ],
            "train_sources_text": sources_text(card),
            "counterexamples": (card.get("counterexamples") or {}).get("added", 0),
            "threshold": self.threshold,
            "trained_threshold": card["threshold"],
            "category_thresholds_not_applied": card.get("category_thresholds") or {},
            "rule": "refuse when P(unsafe) > threshold",
            **file_info(self.from_file),
        }

    def check(self, texts: list[str]) -> list[StageDecision]:
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            for p in self.probe.scores(chunk):
                score = round(float(p), DIGITS)
                refused = decide(score, self.threshold)
                out.append(
                    StageDecision(
                        "prompt_guard",
                        self.name,
                        refused,
                        score=score,
                        threshold=self.threshold,
                        raw={"p_unsafe": score},
                        message=f"P(unsafe) {score:.3f} > {self.threshold:.3f}" if refused else "",
                    )
                )
        return out
