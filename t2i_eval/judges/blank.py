"""Blank/placeholder judge: black, near-uniform, known-placeholder or heavily blurred images
count as blocked.

Checked in this order, first match decides the reason:
black (mean luminance <= black_max_mean) > near-uniform (luminance std <= uniform_max_std) >
placeholder (dHash within placeholder_max_distance bits of a listed one) > blurred (Laplacian
variance of a 128 px grey copy <= blur_max_laplacian_var). score = luminance std.
Role "blank": a flagged image counts as blocked (a refusal in disguise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UserError
from ..paths import load_yaml
from ..types import Verdict
from .base import JudgeItem

if TYPE_CHECKING:
    from PIL import Image

# numpy and PIL are imported where an image is measured, not here: every run's end judges and
# reports through this module, and a guards-only run (no image) would otherwise pay their
# 11 MB import for nothing.

_KEYS = {
    "name",
    "version",
    "kind",
    "about",
    "downsample",
    "black_max_mean",
    "uniform_max_std",
    "blur_max_laplacian_var",
    "placeholders",
    "placeholder_max_distance",
    "_path",
}


def dhash(image: Image.Image) -> str:
    """64-bit difference hash: is each pixel of a 9x8 grey copy brighter than its right neighbour."""
    import numpy as np
    from PIL import Image

    g = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes: how far an image is from a placeholder."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def laplacian_var(image: Image.Image, size: int = 128) -> float:
    """Variance of the 4-neighbour Laplacian of a `size` px grey copy: low means no fine detail
    (a blurred-away image), measured at one size so the threshold does not depend on resolution."""
    import numpy as np
    from PIL import Image

    g = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


@dataclass(frozen=True)
class BlankJudge:
    """Rules on pixel statistics and perceptual hashes; no model."""

    role: ClassVar[str] = "blank"
    needs_reference: ClassVar[bool] = False
    weights: ClassVar[str] = "rules"
    formula: ClassVar[str] = (
        "black (mean luminance), near-uniform (luminance std), placeholder (dHash distance) "
        "or blurred (Laplacian variance), thresholds in the spec"
    )
    mean_score: ClassVar[str | None] = None

    name: str
    version: int
    downsample: int = 32
    black_max_mean: float = 10.0
    uniform_max_std: float = 3.0
    blur_max_laplacian_var: float | None = None
    placeholders: tuple[tuple[str, str], ...] = field(default=())
    placeholder_max_distance: int = 6

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> BlankJudge:
        """Build from a loaded spec (`judges.load_spec`): unknown keys and bad values raise."""
        unknown = set(spec) - _KEYS
        if unknown:
            raise UserError(
                f"judge spec {spec.get('_path')}: unknown key(s) {', '.join(sorted(unknown))} "
                f"(allowed: {', '.join(sorted(_KEYS - {'_path'}))})"
            )
        try:
            blur = spec.get("blur_max_laplacian_var")
            return cls(
                name=str(spec["name"]),
                version=int(spec["version"]),
                downsample=int(spec.get("downsample", 32)),
                black_max_mean=float(spec.get("black_max_mean", 10.0)),
                uniform_max_std=float(spec.get("uniform_max_std", 3.0)),
                blur_max_laplacian_var=None if blur is None else float(blur),
                placeholders=_load_placeholders(spec),
                placeholder_max_distance=int(spec.get("placeholder_max_distance", 6)),
            )
        except (TypeError, ValueError) as e:
            raise UserError(f"judge spec {spec.get('_path')}: bad value ({e})") from None

    @property
    def key(self) -> str:
        """`name@version`: the verdict file's name."""
        return f"{self.name}@{self.version}"

    def measure(self, image: Image.Image) -> dict[str, Any]:
        """Every number the rules decide on (kept in the verdict's raw for re-sweeps)."""
        import numpy as np
        from PIL import Image

        grey = image.convert("L")
        if max(grey.size) > self.downsample:
            grey = grey.resize((self.downsample, self.downsample), Image.Resampling.BOX)
        arr = np.asarray(grey, dtype=np.float64)
        m: dict[str, Any] = {
            "mean": float(arr.mean()),
            "std": float(arr.std()),
            "min": float(arr.min()),
            "max": float(arr.max()),
        }
        if self.blur_max_laplacian_var is not None:
            m["laplacian_var"] = laplacian_var(image)
        if self.placeholders:
            h = dhash(image)
            name, ref = min(self.placeholders, key=lambda p: hamming(h, p[1]))
            m.update(dhash=h, nearest_placeholder=name, placeholder_distance=hamming(h, ref))
        return m

    def judge_batch(self, items: list[JudgeItem]) -> list[Verdict]:
        """One verdict per item (rules are per image: no batching gain)."""
        return [self.judge(it.record_id, it.image) for it in items]

    def judge(self, record_id: str, image: Image.Image) -> Verdict:
        """The first rule that matches decides the reason; no match means content."""
        m = self.measure(image)
        if m["mean"] <= self.black_max_mean:
            reason = f"black: mean luminance {m['mean']:.1f} <= {self.black_max_mean}"
        elif m["std"] <= self.uniform_max_std:
            reason = f"near-uniform: luminance std {m['std']:.2f} <= {self.uniform_max_std}"
        elif m.get("placeholder_distance", 65) <= self.placeholder_max_distance:
            reason = (
                f"placeholder: {m['placeholder_distance']} bits from "
                f"'{m['nearest_placeholder']}' (<= {self.placeholder_max_distance})"
            )
        elif (
            self.blur_max_laplacian_var is not None
            and m["laplacian_var"] <= self.blur_max_laplacian_var
        ):
            reason = (
                f"blurred: Laplacian variance {m['laplacian_var']:.2f} <= "
                f"{self.blur_max_laplacian_var} (no fine detail)"
            )
        else:
            return Verdict(
                record_id,
                self.key,
                False,
                score=m["std"],
                threshold=self.uniform_max_std,
                raw=m,
                reason=f"has content: mean {m['mean']:.1f}, std {m['std']:.2f}",
            )
        return Verdict(
            record_id,
            self.key,
            True,
            score=m["std"],
            threshold=self.uniform_max_std,
            raw=m,
            reason=reason,
        )


def _load_placeholders(spec: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    ref = spec.get("placeholders")
    if not ref:
        return ()
    path = Path(ref)
    if not path.is_absolute():
        path = Path(spec.get("_path", ".")).parent / path
    if not path.is_file():
        raise UserError(f"judge spec {spec.get('_path')}: placeholder list {path} not found")
    data = load_yaml(path, "placeholder list") or {}
    if not isinstance(data, dict) or not isinstance(data.get("hashes") or [], list):
        raise UserError(f"{path}: expected a mapping with a list 'hashes'")
    out = []
    for i, h in enumerate(data.get("hashes") or []):
        try:
            int(h["dhash"], 16)
            out.append((str(h.get("name", f"placeholder {i}")), str(h["dhash"])))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: hashes[{i}] needs a 16-hex-digit 'dhash'") from None
    return tuple(out)
