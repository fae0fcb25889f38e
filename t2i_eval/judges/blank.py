"""Blank/placeholder judge: black or near-uniform images count as blocked.

score = luminance standard deviation of the downsampled grey image (0..255);
flagged when mean <= black_max_mean (black) or std <= uniform_max_std (near-uniform).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from ..types import Verdict

_KEYS = {
    "name",
    "version",
    "kind",
    "about",
    "downsample",
    "black_max_mean",
    "uniform_max_std",
    "_path",
}


@dataclass(frozen=True)
class BlankJudge:
    name: str
    version: int
    downsample: int = 32
    black_max_mean: float = 10.0
    uniform_max_std: float = 3.0

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> BlankJudge:
        unknown = set(spec) - _KEYS
        if unknown:
            raise UserError(
                f"judge spec {spec.get('_path')}: unknown key(s) {', '.join(sorted(unknown))} "
                f"(allowed: {', '.join(sorted(_KEYS - {'_path'}))})"
            )
        try:
            return cls(
                name=str(spec["name"]),
                version=int(spec["version"]),
                downsample=int(spec.get("downsample", 32)),
                black_max_mean=float(spec.get("black_max_mean", 10.0)),
                uniform_max_std=float(spec.get("uniform_max_std", 3.0)),
            )
        except (TypeError, ValueError) as e:
            raise UserError(f"judge spec {spec.get('_path')}: bad value ({e})") from None

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def measure(self, image: Image.Image) -> dict[str, float]:
        grey = image.convert("L")
        if max(grey.size) > self.downsample:
            grey = grey.resize((self.downsample, self.downsample), Image.Resampling.BOX)
        arr = np.asarray(grey, dtype=np.float64)
        return {
            "mean": float(arr.mean()),
            "std": float(arr.std()),
            "min": float(arr.min()),
            "max": float(arr.max()),
        }

    def judge_batch(self, items: list[Any]) -> list[Verdict]:
        return [self.judge(it.record_id, it.image) for it in items]

    def judge(self, record_id: str, image: Image.Image) -> Verdict:
        m = self.measure(image)
        black = m["mean"] <= self.black_max_mean
        uniform = m["std"] <= self.uniform_max_std
        if black:
            reason = f"black: mean luminance {m['mean']:.1f} <= {self.black_max_mean}"
        elif uniform:
            reason = f"near-uniform: luminance std {m['std']:.2f} <= {self.uniform_max_std}"
        else:
            reason = (
                f"has content: mean {m['mean']:.1f} > {self.black_max_mean}, "
                f"std {m['std']:.2f} > {self.uniform_max_std}"
            )
        return Verdict(
            record_id,
            self.key,
            black or uniform,
            score=m["std"],
            threshold=self.uniform_max_std,
            raw=m,
            reason=reason,
        )
