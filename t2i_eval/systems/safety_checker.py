"""The diffusers `StableDiffusionSafetyChecker` as an image-guard stage that keeps its raw scores.

The pipeline's built-in call returns only a black image and a boolean. Here we compute the same
decision from the same model and keep, per image, every concept's cosine similarity, the
per-concept thresholds and the special-care `adjustment`, so a finished run can be re-decided at
other thresholds without generating again (diffusers issues #845, #9003).

Decision rule, as in diffusers' `forward`: for each special-care concept j (in order),
`s_j = round(cos_j - w_j + adj, 3)`, and `adj` becomes 0.01 after the first `s_j > 0`; then for
each concept k, `c_k = round(cos_k - w_k + adj, 3)`; the image is refused when any `c_k > 0`.
Our `score` is `max_k c_k` with `threshold` 0.

Strength: diffusers starts `adj` at 0.0; its comment says to raise it for a stronger filter,
and diffusers PR #9068 calibrated five levels of that starting value on 8,000 SD-1.5 images
(`LEVELS`). The `adjustment` option sets it (a number or a level name); the special-care bump
adds 0.01 on top of it (the PR's draft overwrote the level with 0.01, which would make a weak
level strict after one special-care hit). At 0.0 the rule is diffusers' own. `t2i-eval sweep`
re-decides stored cosines at any adjustment without running the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..types import StageDecision
from .thresholds import check_file_option, file_info, read_thresholds, scalar_threshold
from .torch_utils import import_torch, resolve_device, resolve_dtype

DEFAULT_MODEL = "CompVis/stable-diffusion-safety-checker"

#: The starting adjustment of each strength level, as calibrated in diffusers PR #9068 from the
#: concept scores of ~1,600 flagged images among 8,000 SD-1.5 ones (the PR's criteria: weak
#: "maximum score", medium "average score that triggers", strong "average of all scores", max
#: "absolute value of the minimum score"). Higher flags more.
LEVELS: dict[str, float] = {
    "weak": -0.0690,
    "medium": -0.0175,
    "normal": 0.0,
    "strong": 0.0150,
    "max": 0.0740,
}

#: What diffusers adds to the adjustment once a special-care concept fires.
SPECIAL_CARE_BUMP = 0.01


def decide(
    concept_cos: list[float],
    concept_w: list[float],
    special_cos: list[float],
    special_w: list[float],
    offset: float = 0.0,
) -> dict[str, Any]:
    """Diffusers' rule on stored numbers (pure Python, so re-sweeps need no torch), starting
    from the global adjustment `offset` (0.0: diffusers' default). Refused iff `bad_concepts`.

    The decision is monotone in `offset`: every score is a rounded sum increasing in it, and a
    special-care hit only adds to it; the sweep's search for each image's first refusing
    offset relies on this."""
    adjustment = offset
    special_scores = []
    for cos, w in zip(special_cos, special_w, strict=True):
        s = round(cos - w + adjustment, 3)
        special_scores.append(s)
        if s > 0 and adjustment == offset:
            adjustment = offset + SPECIAL_CARE_BUMP
    concept_scores = [
        round(cos - w + adjustment, 3) for cos, w in zip(concept_cos, concept_w, strict=True)
    ]
    return {
        "special_scores": special_scores,
        "concept_scores": concept_scores,
        "offset": offset,
        "adjustment": adjustment,
        "bad_concepts": [k for k, s in enumerate(concept_scores) if s > 0],
        "special_care": [k for k, s in enumerate(special_scores) if s > 0],
    }


def level_offset(adjustment: float | str) -> float:
    """A level name or a number -> the starting adjustment."""
    if isinstance(adjustment, str):
        if adjustment not in LEVELS:
            raise UserError(
                f"safety_checker: adjustment '{adjustment}' is not a level (levels: "
                f"{', '.join(LEVELS)}; or write a number)"
            )
        return LEVELS[adjustment]
    return float(adjustment)


class SafetyCheckerGuard:
    """Run the SD safety checker on generated images; refuse (black image) when it flags.

    `adjustment`: the starting adjustment, a number or a level of `LEVELS` (default 0.0,
    diffusers' own). `thresholds: FILE`: the adjustment a sweep calibrated instead
    (`systems/thresholds.py`, units 'adjustment')."""

    name = "safety_checker"
    weights = "pretrained"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        subfolder: str | None = None,
        feature_extractor: str | None = None,
        feature_extractor_subfolder: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        adjustment: float | str = 0.0,
        thresholds: str | None = None,
    ) -> None:
        self.from_file = (
            read_thresholds(thresholds, self.name, units="adjustment") if thresholds else None
        )
        self.offset = scalar_threshold(self.from_file, level_offset(adjustment))
        torch = import_torch()
        from .diffusers import import_diffusers

        import_diffusers()
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        if model == "tiny":
            from .tiny import ensure_tiny

            model = str(ensure_tiny())
            subfolder = subfolder or "safety_checker"
            feature_extractor_subfolder = feature_extractor_subfolder or "feature_extractor"
            self.weights = "random"
        elif (Path(model) / "safety_checker").is_dir() and subfolder is None:
            subfolder = "safety_checker"  # a full pipeline folder
            feature_extractor_subfolder = feature_extractor_subfolder or "feature_extractor"
        from .diffusers import is_random_weights

        if is_random_weights(model):
            self.weights = "random"
        self.model = model
        self.subfolder = subfolder
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.checker = (
                StableDiffusionSafetyChecker.from_pretrained(
                    model, subfolder=subfolder, use_safetensors=True, dtype=self.dtype
                )
                .to(self.device)
                .eval()
            )
            self.processor = CLIPImageProcessor.from_pretrained(
                feature_extractor or model, subfolder=feature_extractor_subfolder
            )
        except OSError as e:
            raise UserError(
                f"safety_checker: could not load '{model}' ({str(e).splitlines()[0]})"
            ) from None
        self._torch = torch

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "subfolder": self.subfolder,
            "device": self.device,
            "rule": "refuse when any concept score round(cos - w + adj, 3) > 0 (diffusers)",
            "adjustment": self.offset,
            "concept_thresholds": self.checker.concept_embeds_weights.float().tolist(),
            "special_thresholds": self.checker.special_care_embeds_weights.float().tolist(),
            **file_info(self.from_file),
        }

    @classmethod
    def check_options(cls, **options: Any) -> None:
        check_file_option(cls.name, options, units="adjustment", instead_of="adjustment")

    def embed_cosines(self, images: list[Any]) -> tuple[list[list[float]], list[list[float]]]:
        """Cosine similarity of each image to the 17 concepts and the 3 special-care concepts."""
        torch = self._torch
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.dtype)
        with torch.inference_mode():
            pooled = self.checker.vision_model(pixels)[1]
            emb = torch.nn.functional.normalize(self.checker.visual_projection(pooled).float())
            concepts = torch.nn.functional.normalize(self.checker.concept_embeds.float())
            special = torch.nn.functional.normalize(self.checker.special_care_embeds.float())
            return (emb @ concepts.T).cpu().tolist(), (emb @ special.T).cpu().tolist()

    def check(self, images: list[Any]) -> list[StageDecision]:
        concept_cos, special_cos = self.embed_cosines(images)
        concept_w = self.checker.concept_embeds_weights.float().tolist()
        special_w = self.checker.special_care_embeds_weights.float().tolist()
        out = []
        for ccos, scos in zip(concept_cos, special_cos, strict=True):
            # decided on the stored (rounded) cosines, so a re-sweep reproduces every decision
            ccos = [round(x, 6) for x in ccos]
            scos = [round(x, 6) for x in scos]
            d = decide(ccos, concept_w, scos, special_w, self.offset)
            refused = bool(d["bad_concepts"])
            msg = f"flagged concepts {d['bad_concepts']}" if refused else ""
            out.append(
                StageDecision(
                    "image_guard",
                    self.name,
                    refused,
                    score=max(d["concept_scores"]),
                    threshold=0.0,
                    raw={
                        "concept_cos": ccos,
                        "special_cos": scos,
                        "concept_thresholds": concept_w,
                        "special_thresholds": special_w,
                        **d,
                    },
                    message=msg,
                )
            )
        return out
