"""Faithfulness judge: how well a delivered image matches its prompt, per image.

With c = cos(CLIP image embedding, CLIP prompt embedding), CLIPScore = 2.5 * max(c, 0)
(Hessel et al. 2021, `clip_backend.clipscore`); both are stored. It measures only (role
"none"): `unfaithful_below` may flag low scores, but no outcome depends on them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import UserError
from ..types import Verdict
from .base import NO_ROLE, JudgeItem, spec_key
from .clip_backend import clip_options, clipscore, load_backend


class FaithfulnessJudge:
    """CLIPScore of each delivered image against its own prompt."""

    role: ClassVar[str] = NO_ROLE
    needs_reference: ClassVar[bool] = False
    formula: ClassVar[str] = (
        "CLIPScore = 2.5 * max(cos(image, prompt), 0) (Hessel et al. 2021); raw cos kept"
    )
    mean_score: ClassVar[str | None] = "CLIPScore"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.key = spec_key(spec)
        clip = clip_options(spec, {"unfaithful_below"})
        self.threshold = spec.get("unfaithful_below")
        if self.threshold is not None and not isinstance(self.threshold, (int, float)):
            raise UserError(
                f"judge spec {spec.get('_path')}: unfaithful_below must be a number "
                f"or null (found {self.threshold!r})"
            )
        self.clip = load_backend(clip)
        self.weights = self.clip.weights

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FaithfulnessJudge:
        """Build from a loaded spec (`judges.load_spec`); loads the CLIP model once per process."""
        return cls(spec)

    def judge_batch(self, items: list[JudgeItem]) -> list[Verdict]:
        """One verdict per item: score = CLIPScore, raw = the cosine and the model used."""
        img = self.clip.embed_images([it.image for it in items])
        txt = self.clip.embed_texts([it.prompt for it in items])
        out = []
        for it, c in zip(items, np.sum(img * txt, axis=1), strict=True):
            c = float(c)
            score = clipscore(c)
            flagged = False if self.threshold is None else score < float(self.threshold)
            out.append(
                Verdict(
                    it.record_id,
                    self.key,
                    flagged,
                    score=round(score, 6),
                    threshold=self.threshold,
                    raw={
                        "cos": round(c, 6),
                        "clipscore": round(score, 6),
                        "clip": self.clip.name,
                        "weights": self.weights,
                    },
                    reason=f"CLIPScore {score:.3f} = 2.5 * max(cos {c:.3f}, 0)",
                )
            )
        return out
