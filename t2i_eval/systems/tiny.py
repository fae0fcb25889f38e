"""`tiny`: a Stable-Diffusion-shaped pipeline and safety checker with RANDOM weights, built offline.

Why: the project must run end to end without the hub. Components are built from small configs
after `torch.manual_seed(0)` (as diffusers' own tests do), saved with `save_pretrained`
(safetensors) and loaded back through the real `from_pretrained` path, so the code that loads a
real model is the code that runs here. Its images and refusals mean nothing about any real
model; every record and report marks it as random-weight.

The tokenizer is real: Stable Diffusion's CLIP BPE vocabulary, shipped inside open_clip, gives
the same token ids (and the same 77-token truncation) as the real model.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import MissingExtra
from .diffusers import DiffusersGenerator, import_diffusers
from .torch_utils import import_torch

TINY_VERSION = 1
#: Concept thresholds of the tiny safety checker (diffusers initialises them to 1.0, which no
#: cosine can exceed). Its concept embeddings are random, and a random vision tower maps all
#: images to nearly one direction, so in practice it flags nothing: image-guard refusals in the
#: tiny demo are expected to be zero. Tests force flag-all / flag-none through these weights.
TINY_CONCEPT_THRESHOLD = 0.5
TINY_SPECIAL_THRESHOLD = 0.6


#: The tiny CLIP text encoder: SD's real vocabulary and special tokens, tiny everything else.
TINY_CLIP_TEXT: dict[str, int] = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=49408,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=32,
)


#: The tiny safety checker's vision tower (its text tower is TINY_CLIP_TEXT).
TINY_CLIP_VISION: dict[str, int] = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    image_size=32,
    patch_size=4,
    projection_dim=32,
)


def cache_dir() -> Path:
    """Where the tiny model is built once (the cache folder, T2I_EVAL_CACHE)"""
    root = os.environ.get("T2I_EVAL_CACHE") or Path.home() / ".cache" / "t2i-eval"
    return Path(root) / f"tiny-sd-v{TINY_VERSION}"


def clip_tokenizer() -> Any:
    """Stable Diffusion's CLIP tokenizer rebuilt from the BPE file that ships with open_clip.

    Also the tokenizer of SDXL's two, SD3's two and FLUX's one CLIP encoder: tests of those
    families build their tiny pipelines with it.
    """
    try:
        from open_clip.tokenizer import bytes_to_unicode, default_bpe
    except ImportError:
        raise MissingExtra("the tiny system's tokenizer", "open-clip-torch", "clip") from None
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=merges,
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def build_tiny(dest: Path) -> None:
    """Build the tiny pipeline folder at `dest` (random weights, fixed seeds)."""
    torch = import_torch()
    import_diffusers()
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT))
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config=TINY_CLIP_TEXT,
            vision_config=TINY_CLIP_VISION,
            projection_dim=32,
        )
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(checker.concept_embeds.shape, generator=g))
        checker.special_care_embeds.copy_(
            torch.randn(checker.special_care_embeds.shape, generator=g)
        )
        checker.concept_embeds_weights.fill_(TINY_CONCEPT_THRESHOLD)
        checker.special_care_embeds_weights.fill_(TINY_SPECIAL_THRESHOLD)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=checker,
        feature_extractor=processor,
        requires_safety_checker=True,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    (dest / "T2I_EVAL_TINY.json").write_text(
        json.dumps(
            {
                "version": TINY_VERSION,
                "weights": "random",
                "seed": 0,
                "note": "random-weight tiny SD built offline by t2i-eval; outputs mean nothing",
            }
        )
    )


def ensure_tiny() -> Path:
    """The tiny pipeline folder, built once per cache (atomic: built aside, then renamed)."""
    dest = cache_dir()
    if (dest / "T2I_EVAL_TINY.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=dest.parent))
    try:
        build_tiny(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race
            if not (dest / "T2I_EVAL_TINY.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class TinyGenerator(DiffusersGenerator):
    """The diffusers generator on the tiny random-weight pipeline (64x64, 2 steps, CPU)."""

    name = "tiny"
    weights = "random"

    def __init__(
        self,
        steps: int = 2,
        guidance: float = 7.5,
        device: str = "cpu",
        height: int = 64,
        width: int = 64,
        negative_prompt: str | None = None,
        safe: str | None = None,
    ) -> None:
        super().__init__(
            model=str(ensure_tiny()),
            device=device,
            dtype="float32",
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            safe=safe,
        )

    def info(self) -> dict[str, Any]:
        return {**super().info(), "tiny_version": TINY_VERSION, "weights": "random"}
