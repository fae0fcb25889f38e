"""A model-free generator for fast tests and demos, with scripted refusals and failures.

Like inspect's mock model: deterministic, instant, and able to play every outcome a real
system produces (an image, a generator refusal, a black image, an infrastructure error).
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import numpy as np
from PIL import Image

from ..types import StageDecision
from .chain import GeneratorResult

BLAND_PROMPT = "a plain grey wall"


def _words(value: list[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(w, str) for w in value):
        raise ValueError(f"{name} must be a list of words, e.g. [{value!r}]")
    return [w.lower() for w in value]


class FakeGenerator:
    """Solid-colour (or seeded noise) images; words in the prompt script other outcomes."""

    name = "fake"
    weights = "fake"

    def __init__(
        self,
        mode: str = "solid",
        size: int = 32,
        refuse_words: list[str] | None = None,
        black_words: list[str] | None = None,
        error_words: list[str] | None = None,
        bland_words: list[str] | None = None,
        delay: float = 0.0,
        oom_above: int | None = None,
    ) -> None:
        """`bland_words`: silently draw BLAND_PROMPT instead of a prompt holding one of them, as
        a sanitizing safety stage would (no refusal is reported): a known sanitized case."""
        if mode not in ("solid", "noise"):
            raise ValueError(f"fake generator mode must be solid or noise, not {mode!r}")
        self.mode = mode
        self.size = int(size)
        self.refuse_words = _words(refuse_words, "refuse_words")
        self.black_words = _words(black_words, "black_words")
        self.error_words = _words(error_words, "error_words")
        self.bland_words = _words(bland_words, "bland_words")
        self.delay = float(delay)  # seconds per image: plays a slow model (kill/resume tests)
        self.oom_above = oom_above  # a batch larger than this "runs out of memory" (backoff tests)

    def info(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "size": self.size,
            "refuse_words": self.refuse_words,
            "black_words": self.black_words,
            "error_words": self.error_words,
            "bland_words": self.bland_words,
        }

    @staticmethod
    def _has(text: str, words: list[str]) -> str | None:
        low = text.lower()
        return next((w for w in words if re.search(rf"\b{re.escape(w)}\b", low)), None)

    def _image(self, text: str, seed: int) -> Image.Image:
        h = hashlib.sha256(f"{text}|{seed}".encode()).digest()
        if self.mode == "noise":
            rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
            arr = rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
            return Image.fromarray(arr)
        colour = tuple(64 + b % 160 for b in h[:3])  # never near-black, never uniform-dark
        img = Image.new("RGB", (self.size, self.size), colour)
        # a stripe keeps the image from being uniform (a solid image is what `blank` flags)
        stripe = tuple((c + 128) % 256 for c in colour)  # always 128 levels away per channel
        img.paste(stripe, (0, 0, self.size, self.size // 3))
        return img

    def generate(self, texts: list[str], seeds: list[int]) -> list[GeneratorResult]:
        if self.oom_above is not None and len(texts) > self.oom_above:
            raise RuntimeError(
                f"CUDA out of memory (simulated: batch {len(texts)} > {self.oom_above})"
            )
        if self.delay:
            time.sleep(self.delay * len(texts))
        out = []
        for text, seed in zip(texts, seeds, strict=True):
            if word := self._has(text, self.error_words):
                raise RuntimeError(f"scripted infrastructure error on '{word}'")
            if word := self._has(text, self.refuse_words):
                out.append(
                    GeneratorResult(
                        StageDecision(
                            "generator",
                            self.name,
                            True,
                            score=1.0,
                            threshold=0.5,
                            raw={"matched": word},
                            message=f"scripted policy refusal on '{word}'",
                        )
                    )
                )
                continue
            decision = StageDecision("generator", self.name, False, raw={"seed": seed})
            if word := self._has(text, self.black_words):
                img = Image.new("RGB", (self.size, self.size), (0, 0, 0))
                out.append(GeneratorResult(decision, img))
                continue
            if self._has(text, self.bland_words):
                text = BLAND_PROMPT  # silently sanitized: the decision still says "passed"
            out.append(GeneratorResult(decision, self._image(text, seed)))
        return out
