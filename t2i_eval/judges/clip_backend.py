"""CLIP backend for the image judges: open_clip model + tokenizer, batched, cached per image,
and CLIPScore (the one definition every caller uses).

A judge spec names `clip: {model, pretrained}` (real use: ViT-L-14 / openai). `model: tiny`
is a tiny architecture registered from judges/clip_models/tiny-clip.json and built with random
weights (seeded), for offline tests and demos; every verdict it produces is marked random.
Prompts longer than CLIP's 77-token context are truncated (as open_clip does) with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import MissingExtra, UserError
from ..paths import data_dir

log = logging.getLogger(__name__)

TINY = "tiny"


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise MissingExtra("the CLIP judges", "open-clip-torch", "clip") from None
    return open_clip


@contextlib.contextmanager
def _quiet_download_errors() -> Iterator[None]:
    """open_clip logs "Failed to download weights" itself before raising; our one-line error
    says the same, so drop that log record while loading (a bad input gets one line)."""

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Failed to download weights")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def clipscore(cos: float) -> float:
    """CLIPScore = 2.5 * max(cos(image, prompt), 0) (Hessel et al. 2021).

    The one definition: the faithfulness judge and the rewrite experiment's before/after
    comparison must score the same way, or their numbers would not be comparable. The raw
    cosine is kept beside it wherever it is stored (negative cosines all score 0).
    """
    return 2.5 * max(float(cos), 0.0)


def clip_options(spec: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """A CLIP judge's `clip: {model, pretrained, device}` after checking the spec's keys.

    Every CLIP judge shares the keys name, version, kind, about and clip; `allowed` adds its
    own. Checked before any model loads, so a typo costs no download."""
    unknown = set(spec) - allowed - {"name", "version", "kind", "about", "clip", "_path"}
    if unknown:
        raise UserError(
            f"judge spec {spec.get('_path')}: unknown key(s) {', '.join(sorted(unknown))} "
            f"(allowed: {', '.join(sorted(allowed | {'clip', 'about'}))})"
        )
    clip = spec.get("clip") or {}
    if not isinstance(clip, dict) or "model" not in clip:
        raise UserError(
            f"judge spec {spec.get('_path')}: 'clip' needs a 'model' "
            "(e.g. {model: ViT-L-14, pretrained: openai}, or {model: tiny})"
        )
    return clip


def load_backend(clip: dict[str, Any]) -> ClipBackend:
    """The shared CLIP model that `clip_options` returned (loaded once per process)."""
    return backend(str(clip["model"]), clip.get("pretrained"), clip.get("device", "auto"))


def image_key(image: Any) -> str:
    """Content hash of the pixels: the cache key, whatever file the image came from."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class ClipBackend:
    """Normalized image and text embeddings from one open_clip model."""

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        device: str = "auto",
        batch_size: int = 32,
    ) -> None:
        import torch

        open_clip = _import_open_clip()
        self.weights = "pretrained"
        if model == TINY:
            open_clip.add_model_config(data_dir("judges") / "clip_models" / "tiny-clip.json")
            model, pretrained, self.weights = "tiny-clip", None, "random"
            torch.manual_seed(0)
        elif pretrained is None:
            self.weights = "random"
        self.device = (
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        try:
            with _quiet_download_errors():
                # open_clip takes a checkpoint's .safetensors when the hub has one; otherwise
                # torch.load with weights_only (tensors only, no code), said here, not assumed
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained, device=self.device, weights_only=True
                )
        except (RuntimeError, OSError, ValueError) as e:
            raise UserError(
                f"CLIP model '{model}' / '{pretrained}': could not load ({str(e).splitlines()[0]})"
            ) from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.name = f"{model}/{pretrained}"
        self.batch_size = int(batch_size)
        self._torch = torch
        self._image_cache: dict[str, np.ndarray] = {}
        self._warned: set[str] = set()

    def embed_images(self, images: list[Any]) -> np.ndarray:
        keys = [image_key(im) for im in images]
        todo = [i for i, k in enumerate(keys) if k not in self._image_cache]
        torch = self._torch
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            batch = torch.stack([self.preprocess(images[i].convert("RGB")) for i in idx])
            with torch.inference_mode():
                emb = self.model.encode_image(batch.to(self.device)).float()
                emb = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
            for i, e in zip(idx, emb, strict=True):
                self._image_cache[keys[i]] = e
        return np.stack([self._image_cache[k] for k in keys]) if keys else np.zeros((0, 0))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        limit = getattr(self.tokenizer, "context_length", 77) - 2
        encode = getattr(self.tokenizer, "encode", None)
        for t in texts:
            if encode is not None and t not in self._warned and len(encode(t)) > limit:
                self._warned.add(t)
                log.warning(
                    "prompt longer than CLIP's %d tokens, truncated for judging: %.60s...", limit, t
                )
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            with torch.inference_mode():
                emb = self.model.encode_text(tokens).float()
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))


@lru_cache(maxsize=4)
def backend(model: str, pretrained: str | None, device: str = "auto") -> ClipBackend:
    """One loaded model per (model, pretrained, device) per process: judges share it."""
    return ClipBackend(model, pretrained, device)


def release_models() -> None:
    """Let go of the models `backend` keeps: a process done judging (`t2i-eval run` before
    its report) need not hold them."""
    backend.cache_clear()
