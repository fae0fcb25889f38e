"""The `image-classifier` image guard: any transformers image-classification model (id or
folder, the shape of `Falconsai/nsfw_image_detection`) as its own stage, raw probabilities kept.

score = P(unsafe labels) = the summed softmax probability of the labels named unsafe; the image
is refused when score > threshold. Every label's probability is stored in `raw["probs"]`, so a
finished run can be re-decided at another threshold or another choice of unsafe labels
(`decide`) without generating again.
"""

from __future__ import annotations

from typing import Any

from ..errors import MissingExtra, UserError, shorten
from ..types import StageDecision
from .thresholds import check_file_option, file_info, read_thresholds, scalar_threshold
from .torch_utils import resolve_device

NAME = "image-classifier"

#: Label words read as unsafe when the spec names no `unsafe_labels` (e.g. Falconsai's "nsfw");
#: the same words as the text classifier guard's.
UNSAFE_WORDS = ("unsafe", "nsfw", "toxic", "harm", "offensive", "hate")

#: Probabilities are stored, and decided on, at this many decimals: a re-decision from the
#: stored numbers reproduces every decision exactly.
DECIMALS = 6


def pick_unsafe_labels(labels: list[str], unsafe_labels: list[str] | None) -> list[str]:
    """The labels whose probabilities make the score: those the spec names, each checked
    against the model's labels, or by default the labels containing an `UNSAFE_WORDS` word
    (a binary model with neutral names, LABEL_0/LABEL_1: by convention label 1)."""
    if unsafe_labels is None:
        unsafe_labels = [lab for lab in labels if any(w in lab.lower() for w in UNSAFE_WORDS)]
        if not unsafe_labels and len(labels) == 2:
            unsafe_labels = [labels[1]]
    missing = [lab for lab in unsafe_labels if lab not in labels]
    if missing or not unsafe_labels:
        raise UserError(
            f"{NAME}: unsafe_labels {unsafe_labels} must name labels of the model (have: "
            f"{', '.join(labels)}); set unsafe_labels in the system spec"
        )
    return list(unsafe_labels)


def decide(
    probs: dict[str, float], unsafe_labels: list[str], threshold: float
) -> tuple[float, bool]:
    """(score, refused) from stored per-label probabilities: score = their sum over
    `unsafe_labels`, rounded to `DECIMALS`; refused when score > threshold."""
    score = round(sum(probs[lab] for lab in unsafe_labels), DECIMALS)
    return score, score > threshold


class ImageClassifierGuard:
    """Any transformers image-classification model; score = total probability of unsafe labels.

    `model`: a hub id or a folder saved with `save_pretrained` (safetensors weights and an image
    processor config). `unsafe_labels`: which of the model's labels count as unsafe (default:
    `pick_unsafe_labels`). `threshold`, or `thresholds: FILE`: a sweep's calibrated threshold
    (`systems/thresholds.py`). `weights: random` labels an untrained model in reports.
    `trust_remote_code` runs the model repo's own Python when loading: off unless the spec sets
    it to true (recorded in the manifest)."""

    name = NAME
    weights = "pretrained"

    @classmethod
    def listing(cls) -> str:
        """What it needs, for `t2i-eval list`."""
        return (
            "any transformers image-classification model id or folder "
            "(e.g. Falconsai/nsfw_image_detection, hub, on first use); "
            "pip install 't2i-eval[diffusers]'"
        )

    def __init__(
        self,
        model: str,
        unsafe_labels: list[str] | None = None,
        threshold: float = 0.5,
        device: str = "auto",
        batch_size: int = 16,
        weights: str = "pretrained",
        trust_remote_code: bool = False,
        thresholds: str | None = None,
    ) -> None:
        if not isinstance(trust_remote_code, bool):
            raise UserError(f"{NAME}: trust_remote_code must be true or false")
        if weights not in ("pretrained", "random"):
            raise UserError(f"{NAME}: weights must be pretrained or random, not {weights!r}")
        self.from_file = read_thresholds(thresholds, NAME) if thresholds else None
        self.threshold = scalar_threshold(self.from_file, threshold)
        try:
            import torch
            from transformers import AutoImageProcessor, AutoModelForImageClassification
        except ImportError:
            raise MissingExtra(f"the {NAME} guard", "transformers", "diffusers") from None
        self._torch = torch
        self.device = resolve_device(device)
        remote = {"trust_remote_code": trust_remote_code}
        try:
            self.processor = AutoImageProcessor.from_pretrained(model, **remote)
            self.model = (
                AutoModelForImageClassification.from_pretrained(
                    model, use_safetensors=True, **remote
                )
                .to(self.device)
                .eval()
            )
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{NAME}: could not load '{model}' as an image classifier ({shorten(first, 200)});"
                " give a transformers image-classification model id or folder"
            ) from None
        config = self.model.config
        self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        self.unsafe_labels = pick_unsafe_labels(self.labels, unsafe_labels)
        self.model_ref, self.trust_remote_code = model, trust_remote_code
        self.batch_size = int(batch_size)
        self.weights = weights

    @classmethod
    def check_options(cls, **options: Any) -> None:
        check_file_option(NAME, options)

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_ref,
            "labels": self.labels,
            "unsafe_labels": self.unsafe_labels,
            "threshold": self.threshold,
            "device": self.device,
            "rule": "refuse when P(unsafe labels) > threshold",
            "trust_remote_code": self.trust_remote_code,
            **file_info(self.from_file),
        }

    def _pixels(self, image: Any) -> Any:
        """One image as the model's input tensor (RGB, resized by the model's own processor)."""
        return self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values

    def check(self, images: list[Any]) -> list[StageDecision]:
        """One decision per image; an image the processor cannot read is refused=None (could
        not check: the item becomes an error), never a pass or a refusal."""
        torch = self._torch
        out: list[StageDecision | None] = [None] * len(images)
        ready: list[tuple[int, Any]] = []
        for i, image in enumerate(images):
            try:
                ready.append((i, self._pixels(image)))
            except Exception as e:  # a damaged or empty image: this one only
                reason = f"could not process the image ({type(e).__name__}: {shorten(str(e))})"
                out[i] = StageDecision("image_guard", NAME, None, message=reason)
        for start in range(0, len(ready), self.batch_size):
            chunk = ready[start : start + self.batch_size]
            pixels = torch.cat([p for _, p in chunk]).to(self.device)
            with torch.inference_mode():
                logits = self.model(pixel_values=pixels).logits.float()
                rows = torch.softmax(logits, dim=-1).cpu().tolist()
            for (i, _), row in zip(chunk, rows, strict=True):
                out[i] = self._decision(row)
        return [d for d in out if d is not None]

    def _decision(self, row: list[float]) -> StageDecision:
        probs = {lab: round(p, DECIMALS) for lab, p in zip(self.labels, row, strict=True)}
        score, refused = decide(probs, self.unsafe_labels, self.threshold)
        return StageDecision(
            "image_guard",
            NAME,
            refused,
            score=score,
            threshold=self.threshold,
            raw={"probs": probs, "unsafe_labels": self.unsafe_labels},
            message=f"P({'+'.join(self.unsafe_labels)}) {score:.3f} > {self.threshold}"
            if refused
            else "",
        )
