"""Frozen text encoders a probe is trained on: `minilm`, `st:ID_OR_PATH`, `clip-text:MODEL_OR_PATH`.

Every encoder goes through the shared embedding cache (`embed_cache`): training, cross-validation,
the guard at run time and the leave-one-source-out matrix ask for the same prompts many times.
`clip-text:` is the T2I pipeline's own CLIP text encoder read at the [EOS] token, as SafeGuider
does: a probe on it sees exactly what the generator sees (the same 77-token truncation).

Sentence-transformers encoders (`minilm`, `st:`) also run on the ONNX backends of the concept guard
(`backend`: `onnx`, `onnx-int8`; `systems/fast_encoder.py`) at run time; `clip-text:` runs on torch
only. Training always reads torch vectors, and the card pins the weights, not the backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import MissingExtra, UserError, shorten
from ..systems.fast_encoder import BACKENDS, DEFAULT_BACKEND, check_backend

if TYPE_CHECKING:
    import numpy as np

MINILM = "minilm"
KINDS = ("minilm", "st:ID_OR_PATH", "clip-text:MODEL_OR_PATH")
#: Encoder kinds that run on backend torch only: the ONNX export (`fast_encoder`) covers
#: sentence-transformers module stacks, not CLIP's [EOS] read-out.
TORCH_ONLY = ("clip-text",)
#: Rows per forward pass; embeddings are row-independent, so this changes speed only.
BATCH = 64


class Encoder(Protocol):
    """What a probe needs from an encoder (frozen: it is never trained here)."""

    id: str
    """The reference it was loaded from: `minilm`, `st:...`, `clip-text:...`."""
    digest: str
    """sha256 of its weights (`embed_cache.weights_digest`): the card pins the exact encoder."""
    weights: str
    """`pretrained`, or `random` (the tiny pipeline's CLIP): reports say so."""
    dim: int
    """Length of one embedding."""

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """float32 [len(texts), dim], in input order."""
        ...


class SentenceEncoder:
    """A sentence-transformers model (`minilm` is the bundled all-MiniLM-L6-v2), L2-normalised
    mean-pooled embeddings, through `text_guards.load_sentence_model` (shared, cached) on
    `backend` (`torch`, `onnx`, `onnx-int8`)."""

    weights = "pretrained"

    def __init__(self, ref: str, model: str, backend: str = DEFAULT_BACKEND) -> None:
        from ..embed_cache import weights_digest
        from ..systems.text_guards import load_sentence_model

        self.id = ref
        self.model = load_sentence_model(model, backend=backend)
        # the card pins the weights, whatever runs them: an ONNX backend keeps the digest its
        # export was made from (its cache digest is `fast_encoder.vectors_digest`); on torch
        # the cached encoder's digest is it, unless the cache is off ("off": hash the model)
        inner = self.model.model
        digest = getattr(inner, "weights_digest", None) or self.model.digest
        self.digest = digest if digest != "off" else weights_digest(inner)
        dim = getattr(self.model, "get_embedding_dimension", None)  # sentence-transformers >= 6
        dim = dim or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts), normalize_embeddings=True, batch_size=BATCH, show_progress_bar=progress
        )
        return np.asarray(out, dtype=np.float32)


class _ClipEos:
    """CLIPTextModel + tokenizer with a sentence-transformers-like `.encode`, so that
    `embed_cache.cached_encoder` can wrap it: the hidden state at [EOS] (CLIP's pooled output,
    after the final layer norm), prompts padded and truncated to the tokenizer's 77 tokens."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def __repr__(self) -> str:
        return f"ClipEos({self.model.config.to_json_string(use_diff=False)!r})"

    def encode(
        self,
        texts: Sequence[str],
        normalize_embeddings: bool = False,
        batch_size: int = BATCH,
        show_progress_bar: bool = False,
        **_: Any,
    ) -> np.ndarray:
        import numpy as np
        import torch
        from tqdm import tqdm

        rows = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="clip-text", unit="batch", disable=not show_progress_bar):
            enc = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                pooled = self.model(**enc).pooler_output.float()
            if normalize_embeddings:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            rows.append(pooled.numpy())
        dim = self.model.config.hidden_size
        return np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)


class ClipTextEncoder:
    """A T2I pipeline's CLIP text encoder (`clip-text:tiny`, a pipeline folder with
    `text_encoder/` + `tokenizer/`, or a CLIP text model folder or id)."""

    def __init__(self, ref: str, model: str) -> None:
        from ..embed_cache import cached_encoder, weights_digest
        from ..systems.torch_utils import import_torch

        import_torch()
        try:
            import transformers
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise MissingExtra("the clip-text encoder", "transformers", "diffusers") from None
        transformers.utils.logging.disable_progress_bar()  # ours is the one users read
        self.id = ref
        folder, self.weights = _clip_folder(model)
        try:
            text_model, tokenizer = _load_clip_text(CLIPTextModel, CLIPTokenizer, folder)
        except (OSError, ValueError) as e:
            raise UserError(
                f"encoder '{ref}': could not load a CLIP text model from {shorten(model)} "
                f"({str(e).splitlines()[0]}); expected a pipeline folder with text_encoder/ and "
                "tokenizer/, a CLIP text model folder, or 'tiny'"
            ) from None
        inner = _ClipEos(text_model, tokenizer)
        self.digest = weights_digest(inner)
        self.model = cached_encoder(inner, ref, digest=self.digest)
        self.dim = int(text_model.config.hidden_size)

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(list(texts), batch_size=BATCH, show_progress_bar=progress)
        return np.asarray(out, dtype=np.float32)


def _load_clip_text(model_cls: Any, tokenizer_cls: Any, folder: str) -> tuple[Any, Any]:
    """The text encoder and tokenizer of a pipeline (its `text_encoder/` and `tokenizer/`
    subfolders, local or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5), or of a
    bare CLIP text model folder or id."""
    local = Path(folder).is_dir()
    if not local or (Path(folder) / "text_encoder").is_dir():
        try:
            return (
                model_cls.from_pretrained(
                    folder, subfolder="text_encoder", use_safetensors=True
                ).eval(),
                tokenizer_cls.from_pretrained(folder, subfolder="tokenizer"),
            )
        except (OSError, ValueError):
            if local:
                raise
    return (
        model_cls.from_pretrained(folder, use_safetensors=True).eval(),
        tokenizer_cls.from_pretrained(folder),
    )


def _clip_folder(model: str) -> tuple[str, str]:
    """(folder or id, weights kind). `tiny` is the tiny pipeline (random weights, built offline);
    a folder that the tiny builder wrote says so in T2I_EVAL_TINY.json."""
    if model == "tiny":
        from ..systems.tiny import ensure_tiny

        return str(ensure_tiny()), "random"
    marker = Path(model) / "T2I_EVAL_TINY.json"
    if marker.is_file():
        try:
            weights = json.loads(marker.read_text(encoding="utf-8")).get("weights", "random")
        except (OSError, ValueError, AttributeError):
            weights = "random"
        return model, str(weights)
    return model, "pretrained"


def check_encoder_backend(ref: str, backend: object, where: str) -> str:
    """`backend`, checked (`fast_encoder.check_backend`) and one that encoder `ref` runs on; else a
    one-line UserError prefixed by `where` (cheap: nothing loads, so a spec check can call it)."""
    backend = check_backend(backend, where)
    kind = ref.partition(":")[0]
    if kind in TORCH_ONLY and backend != "torch":
        others = ", ".join(b for b in BACKENDS if b != "torch")
        raise UserError(
            f"{where}: encoder {shorten(ref)!r} runs on backend torch only, not {backend!r} "
            f"({others} are for sentence-transformers encoders: minilm, st:...); use backend: torch"
        )
    return backend


def load_encoder(ref: str = MINILM, backend: str = DEFAULT_BACKEND) -> Encoder:
    """The encoder named by `ref` (see the module docstring) on `backend`; a bad ref, or a backend
    the encoder does not run on, is a one-line UserError."""
    backend = check_encoder_backend(ref, backend, "probe encoder")
    kind, colon, arg = ref.partition(":")
    if ref == MINILM:
        return SentenceEncoder(ref, MINILM, backend)
    if colon and kind == "st" and arg:
        return SentenceEncoder(ref, arg, backend)
    if colon and kind == "clip-text" and arg:
        return ClipTextEncoder(ref, arg)
    raise UserError(
        f"unknown encoder {shorten(ref)!r}; expected one of {', '.join(KINDS)} "
        "(e.g. --encoder st:sentence-transformers/all-mpnet-base-v2, --encoder clip-text:tiny)"
    )
