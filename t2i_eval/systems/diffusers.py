"""The diffusers generator: any text-to-image pipeline by model id or local folder.

Built with `safety_checker=None` so an image is never silently blacked out; the safety checker
runs as its own image-guard stage (`safety_checker.py`) and keeps its raw scores.
"""

from __future__ import annotations

from typing import Any

from ..errors import MissingExtra, UserError
from ..types import StageDecision
from .base import GeneratorResult
from .torch_utils import import_torch, resolve_device, resolve_dtype


def is_random_weights(model: str) -> bool:
    """A folder our tiny builder wrote (marker file) holds random weights, whatever loads it."""
    from pathlib import Path

    return (Path(model) / "T2I_EVAL_TINY.json").is_file()


def import_diffusers() -> Any:
    """Import diffusers with its and transformers' per-load progress bars and info logs off:
    our own progress bar is the one a user reads."""
    try:
        import diffusers
        import transformers
    except ImportError:
        raise MissingExtra("the diffusers generator", "diffusers", "diffusers") from None
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return diffusers


SLD_LEVELS = ("weak", "medium", "strong", "max")


def resolve_negative_prompt(value: str | None) -> str | None:
    """A name from guards/negative_prompts.yaml (e.g. `safety`), else the literal prompt."""
    if not value:
        return None
    import yaml

    from ..paths import data_dir

    path = data_dir("guards") / "negative_prompts.yaml"
    named = (
        (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("prompts", {})
        if (path.is_file())
        else {}
    )
    return str(named.get(value, value))


def load_pipeline(
    model: str,
    *,
    dtype: Any,
    variant: str | None = None,
    revision: str | None = None,
    safe: str | None = None,
) -> Any:
    """`AutoPipelineForText2Image`, falling back to `DiffusionPipeline` for unmapped families.

    Safetensors only, and never the model repo's own code (no trust_remote_code): loading a
    model must not run code from it. Both paths drop the built-in safety checker, which runs
    as its own stage instead.
    """
    diffusers = import_diffusers()
    if (
        safe is not None
    ):  # Safe Latent Diffusion: deprecated in diffusers, kept (pinned) to measure it
        return diffusers.StableDiffusionPipelineSafe.from_pretrained(
            model,
            safety_checker=None,
            requires_safety_checker=False,
            dtype=dtype,
            use_safetensors=True,
            variant=variant,
            revision=revision,
        )
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        use_safetensors=True,
        variant=variant,
        revision=revision,
    )
    try:
        return diffusers.AutoPipelineForText2Image.from_pretrained(
            model, safety_checker=None, requires_safety_checker=False, **kwargs
        )
    except ValueError as e:
        if "AutoPipeline can't find a pipeline" not in str(e):
            raise
    return diffusers.DiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False, **kwargs
    )


class DiffusersGenerator:
    """Generate with a diffusers pipeline; one torch.Generator per item makes seeds per-image."""

    name = "diffusers"
    weights = "pretrained"

    def __init__(
        self,
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        device: str = "auto",
        dtype: str = "auto",
        steps: int = 25,
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        safe: str | None = None,
        channels_last: bool = False,
    ) -> None:
        """`negative_prompt`: a literal prompt or a name from guards/negative_prompts.yaml
        (`safety`); `safe`: Safe Latent Diffusion at SafetyConfig weak|medium|strong|max."""
        if safe is not None and safe not in SLD_LEVELS:
            raise ValueError(f"safe must be one of {', '.join(SLD_LEVELS)}, not {safe!r}")
        self.safe = safe
        self.model = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.height = height
        self.width = width
        self.negative_prompt = resolve_negative_prompt(negative_prompt)
        try:
            self.pipe = load_pipeline(
                model,
                dtype=self.dtype,
                variant=variant,
                revision=revision,
                safe=safe,
            ).to(self.device)
        except OSError as e:
            raise UserError(
                f"diffusers: could not load '{model}' ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
                "Give a local folder, or a hub id on a machine with hub access."
            ) from None
        self.pipe.set_progress_bar_config(disable=True)
        self.channels_last = bool(channels_last)
        self.compiled = False
        denoiser = self._denoiser()
        if self.channels_last and denoiser is not None:
            import torch

            denoiser.to(memory_format=torch.channels_last)
        if is_random_weights(model):
            self.weights = "random"

    def _denoiser(self) -> Any:
        return getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)

    def _attention(self) -> str | None:
        """The denoiser's attention processor (AttnProcessor2_0 = torch SDPA, diffusers' default
        on torch >= 2)."""
        procs = getattr(self._denoiser(), "attn_processors", None) or {}
        return type(next(iter(procs.values()))).__name__ if procs else None

    def compile(self) -> None:
        """torch.compile the denoiser (UNet or transformer): slower first batch, faster after."""
        import torch

        name = "unet" if getattr(self.pipe, "unet", None) is not None else "transformer"
        setattr(self.pipe, name, torch.compile(getattr(self.pipe, name)))
        self.compiled = True

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pipeline": type(self.pipe).__name__,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "steps": self.steps,
            "guidance": self.guidance,
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
            "safe_latent_diffusion": self.safe,
            "channels_last": self.channels_last,
            "compiled": self.compiled,
            "attention": self._attention(),
        }

    def generate(self, texts: list[str], seeds: list[int]) -> list[GeneratorResult]:
        torch = import_torch()
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = dict(
            prompt=list(texts),
            generator=gens,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            output_type="pil",
        )
        if self.height:
            kwargs["height"] = self.height
        if self.width:
            kwargs["width"] = self.width
        if self.negative_prompt:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(texts)
        if self.safe is not None:
            from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

            kwargs.update(getattr(SafetyConfig, self.safe.upper()))
        with torch.inference_mode():
            out = self.pipe(**kwargs)
        nsfw = getattr(out, "nsfw_content_detected", None)
        results = []
        for i, (img, seed) in enumerate(zip(out.images, seeds, strict=True)):
            flagged = None if nsfw is None else bool(nsfw[i])
            decision = StageDecision(
                "generator",
                self.name,
                bool(flagged),
                raw={"seed": int(seed), "builtin_nsfw_flag": flagged},
                message="pipeline's own filter flagged the image" if flagged else "",
            )
            results.append(GeneratorResult(decision, img))
        return results
