"""The diffusers generator: any text-to-image pipeline by model id or local folder.

One class for every family (SD-1.5/2.1, SDXL, SD3 with its T5 encoder, FLUX): each family's
differences live in its pipeline's `__call__` signature, which decides what is passed. Built
with `safety_checker=None` so an image is never silently blacked out; the safety checker runs
as its own image-guard stage (`safety_checker.py`) and keeps its raw scores. Weights load as
safetensors only, and code from a model repo runs only with `trust_remote_code=True`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ..errors import MissingExtra, UserError
from ..types import StageDecision
from .chain import GeneratorResult
from .torch_utils import import_torch, resolve_device, resolve_dtype


def is_random_weights(model: str) -> bool:
    """A folder our tiny builder wrote (marker file) holds random weights, whatever loads it."""
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
    from ..paths import data_dir, load_yaml

    path = data_dir("guards") / "negative_prompts.yaml"
    named = ((load_yaml(path, "negative prompts") or {}).get("prompts", {})) if path.is_file() else {}
    return str(named.get(value, value))


#: File endings of pickle-based weights: loading one can run code, so they are never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle_only(model: str) -> None:
    """Refuse a local folder where some component has pickle weights and no safetensors.

    `use_safetensors=True` already makes diffusers refuse them, but with a message about a
    missing file; this says why and what to do, before anything is loaded.
    """
    root = Path(model)
    if not root.is_dir():
        return  # a hub id: diffusers downloads safetensors only (use_safetensors=True)
    pickles = [p for p in root.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file()]
    for folder in sorted({p.parent for p in pickles}):
        if not any(folder.glob("*.safetensors")):
            names = ", ".join(sorted(p.name for p in pickles if p.parent == folder))
            raise UserError(
                f"diffusers: {folder} holds weights only as pickle files ({names}); t2i-eval loads "
                "safetensors only, because loading a pickle can run code. Convert it once where "
                "you trust it: load it and save_pretrained(DIR, safe_serialization=True)."
            )


def load_pipeline(
    model: str,
    *,
    dtype: Any,
    variant: str | None = None,
    revision: str | None = None,
    safe: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """`AutoPipelineForText2Image`, falling back to `DiffusionPipeline` for unmapped families.

    Safetensors only. The model repo's own code (custom pipelines or components) runs only when
    the user passes `trust_remote_code=True`; the keyword is passed only then, so an unset flag
    leaves diffusers' own default (False) in charge. Both paths drop the built-in
    safety checker, which runs as its own stage instead (pipelines without one ignore it).
    """
    diffusers = import_diffusers()
    refuse_pickle_only(model)
    kwargs: dict[str, Any] = dict(
        safety_checker=None,
        requires_safety_checker=False,
        dtype=dtype,
        use_safetensors=True,
        variant=variant,
        revision=revision,
    )
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if safe is not None:
        # Safe Latent Diffusion: deprecated in diffusers, kept (pinned) to measure it
        return diffusers.StableDiffusionPipelineSafe.from_pretrained(model, **kwargs)
    try:
        return diffusers.AutoPipelineForText2Image.from_pretrained(model, **kwargs)
    except ValueError as e:
        if "AutoPipeline can't find a pipeline" not in str(e):
            raise
    return diffusers.DiffusionPipeline.from_pretrained(model, **kwargs)


#: Generator option -> the pipeline `__call__` keyword it sets.
CALL_KEYWORDS = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "height": "height",
    "width": "width",
    "negative_prompt": "negative_prompt",
    "max_sequence_length": "max_sequence_length",
}


def call_options(pipe: Any, requested: dict[str, Any]) -> dict[str, Any]:
    """The `__call__` keywords for the options that are set (None = the pipeline's default).

    Families differ (SD-1.5/2.1 and SDXL have no `max_sequence_length`; FLUX takes a negative
    prompt only for "true CFG"), so a keyword is passed only where `__call__` takes it. An option
    the pipeline would not take, or would take and ignore, is an error rather than a silent
    drop: the manifest would otherwise record a setting that never applied.
    """
    params = inspect.signature(pipe.__call__).parameters
    family = type(pipe).__name__
    out = {}
    for option, value in requested.items():
        if value is None:
            continue
        keyword = CALL_KEYWORDS[option]
        if keyword not in params:
            raise UserError(
                f"diffusers: {family} takes no '{keyword}', so option '{option}' cannot apply; "
                "remove it from the generator options"
            )
        out[keyword] = value
    if "negative_prompt" in out and "true_cfg_scale" in params:
        raise UserError(
            f"diffusers: {family} applies a negative prompt only with true CFG (true_cfg_scale > 1), "
            "which this generator does not use; remove option 'negative_prompt'"
        )
    return out


def effective_call(pipe: Any, passed: dict[str, Any]) -> dict[str, Any]:
    """What each `CALL_KEYWORDS` keyword the pipeline takes will be: ours, else its default."""
    params = inspect.signature(pipe.__call__).parameters
    return {k: passed.get(k, params[k].default) for k in CALL_KEYWORDS.values() if k in params}


def guidance_semantics(pipe: Any) -> str:
    """What `guidance_scale` means for this pipeline: the same number is not the same knob."""
    config = getattr(getattr(pipe, "transformer", None), "config", None) or {}
    if "guidance_embeds" in config:  # FLUX: guidance is an input of a distilled model, not CFG
        if config["guidance_embeds"]:
            return "distilled guidance input (no CFG)"
        return "ignored (no guidance input, no CFG)"
    return "classifier-free guidance (off at <= 1)"


def text_encoders(pipe: Any) -> dict[str, str]:
    """Loaded text encoders by component name (shows, e.g., that SD3's T5 was kept)."""
    return {
        name: type(module).__name__
        for name, module in getattr(pipe, "components", {}).items()
        if name.startswith("text_encoder") and module is not None
    }


class DiffusersGenerator:
    """Generate with a diffusers pipeline; one torch.Generator per item makes seeds per-image."""

    name = "diffusers"
    weights = "pretrained"

    def __init__(
        self,
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        device: str = "auto",
        dtype: str = "auto",
        steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        max_sequence_length: int | None = None,
        variant: str | None = None,
        revision: str | None = None,
        safe: str | None = None,
        channels_last: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        """Options left None take the pipeline's own `__call__` default (each family has its
        own steps and guidance), recorded in `info()`.

        `negative_prompt`: a literal prompt or a name from guards/negative_prompts.yaml
        (`safety`); `max_sequence_length`: T5 tokens (SD3, FLUX); `safe`: Safe Latent Diffusion
        at SafetyConfig weak|medium|strong|max; `trust_remote_code`: allow code from the model
        repo (custom pipelines): off unless set, because loading a model must not run its code.
        """
        if safe is not None and safe not in SLD_LEVELS:
            raise ValueError(f"safe must be one of {', '.join(SLD_LEVELS)}, not {safe!r}")
        self.safe = safe
        self.model = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.negative_prompt = resolve_negative_prompt(negative_prompt)
        self.trust_remote_code = bool(trust_remote_code)
        try:
            self.pipe = load_pipeline(
                model,
                dtype=self.dtype,
                variant=variant,
                revision=revision,
                safe=safe,
                trust_remote_code=self.trust_remote_code,
            ).to(self.device)
        except OSError as e:
            raise UserError(
                f"diffusers: could not load '{model}' ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
                "Give a local folder with safetensors weights, or a hub id on a machine with hub access."
            ) from None
        self.call = call_options(
            self.pipe,
            {
                "steps": None if steps is None else int(steps),
                "guidance": None if guidance is None else float(guidance),
                "height": None if height is None else int(height),
                "width": None if width is None else int(width),
                "negative_prompt": self.negative_prompt,
                "max_sequence_length": (
                    None if max_sequence_length is None else int(max_sequence_length)
                ),
            },
        )
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
        call = effective_call(self.pipe, self.call)
        return {
            "model": self.model,
            "pipeline": type(self.pipe).__name__,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "steps": call.get("num_inference_steps"),
            "guidance": call.get("guidance_scale"),
            "guidance_semantics": guidance_semantics(self.pipe),
            "height": call.get("height"),
            "width": call.get("width"),
            "negative_prompt": self.negative_prompt,
            "max_sequence_length": call.get("max_sequence_length"),
            "call": call,
            "text_encoders": text_encoders(self.pipe),
            "safetensors_only": True,
            "trust_remote_code": self.trust_remote_code,
            "safe_latent_diffusion": self.safe,
            "channels_last": self.channels_last,
            "compiled": self.compiled,
            "attention": self._attention(),
        }

    def generate(self, texts: list[str], seeds: list[int]) -> list[GeneratorResult]:
        torch = import_torch()
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = dict(
            self.call, prompt=list(texts), generator=gens, output_type="pil"
        )
        if "negative_prompt" in kwargs:
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
