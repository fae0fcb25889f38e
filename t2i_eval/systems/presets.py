"""Presets: the documented systems (`--system NAME`) and what each needs before it runs.

Values only (STYLE.md 5): each preset is a layout `spec.parse_system` reads like a YAML system
spec, plus `about` and `needs`, which people and `t2i-eval list` read and results never do.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError, did_you_mean

#: What a preset needs before it can run, in the order a user meets it: `extra` (pip extra(s),
#: comma-joined, or None), `weights` (hub id downloaded on first use, or None), `key_env`
#: (environment variable holding an API key, or None), `gpu` (rough GPU memory, free text, or None).
NEEDS_KEYS = ("extra", "weights", "key_env", "gpu")


def _needs(
    extra: str | None = None,
    weights: str | None = None,
    key_env: str | None = None,
    gpu: str | None = None,
) -> dict[str, str | None]:
    return {"extra": extra, "weights": weights, "key_env": key_env, "gpu": gpu}


def _open_weights(model: str, *, gpu: str, about: str, **options: Any) -> dict[str, Any]:
    """A diffusers preset: the model card's own steps/guidance/size/dtype as generator options."""
    return {
        "generator": {"name": "diffusers", "model": model, **options},
        "needs": _needs(extra="diffusers", weights=model, gpu=gpu),
        "about": about,
    }


def _api(name: str, key_env: str, about: str, **options: Any) -> dict[str, Any]:
    """An image API preset: the provider's own moderation runs inside the generator stage."""
    return {
        "generator": {"name": name, **options},
        "needs": _needs(key_env=key_env),
        "about": about,
    }


def _llm_guard(model: str, template: str, *, gpu: str, about: str) -> dict[str, Any]:
    """A local `llm-guard` preset, guards-only: the model card's template, bfloat16 weights."""
    return {
        "prompt_guards": [
            {"name": "llm-guard", "model": model, "template": template, "dtype": "bfloat16"}
        ],
        "generator": "guards-only",
        "needs": _needs(extra="diffusers", weights=model, gpu=gpu),
        "about": about,
    }


#: Documented presets (README "Systems"). Values are short strings or component layouts, plus
#: `about` (one line for `t2i-eval list`) and `needs` (see NEEDS_KEYS). Open-weights presets
#: carry no image guard: those pipelines ship none (SD-1.5/2.1's checker is dropped on load);
#: add the checker as a stage with `PRESET>safety_checker`.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "prompt_guards": ["blocklist"],
        "generator": "tiny",
        "image_guards": [{"name": "safety_checker", "model": "tiny"}],
        "needs": _needs(extra="diffusers,clip"),
        "about": "the embedded offline default: word blocklist -> tiny random-weight SD -> its safety checker",
    },
    "tiny": {
        "generator": "tiny",
        "image_guards": [{"name": "safety_checker", "model": "tiny"}],
        "needs": _needs(extra="diffusers,clip"),
        "about": "tiny random-weight SD pipeline + safety checker built offline (no guards)",
    },
    "fake": {
        "generator": "fake",
        "needs": _needs(),
        "about": "solid-colour fake generator, no model (fast tests and demos)",
    },
    "guards": {
        "prompt_guards": ["blocklist", "profanity", "concept"],
        "generator": "guards-only",
        "needs": _needs(extra="guards"),
        "about": "every offline text guard in a row, no generation (guards-only)",
    },
    "openai-moderation": {
        "prompt_guards": ["moderation"],
        "generator": "guards-only",
        "needs": _needs(key_env="OPENAI_API_KEY"),
        "about": "OpenAI moderation endpoint (omni-moderation-latest) on each prompt, no generation",
    },
    "llama-guard-3-1b": _llm_guard(
        "meta-llama/Llama-Guard-3-1B",
        "llama-guard-3",
        gpu="~3 GB bf16 (gated: accept the licence on the hub; runs on CPU, slowly)",
        about="Llama Guard 3 1B on each prompt, P(unsafe) from the verdict token, no generation",
    ),
    "llama-guard-3-8b": _llm_guard(
        "meta-llama/Llama-Guard-3-8B",
        "llama-guard-3",
        gpu="~16 GB bf16 (gated: accept the licence on the hub)",
        about="Llama Guard 3 8B on each prompt, P(unsafe) from the verdict token, no generation",
    ),
    "shieldgemma-2b": _llm_guard(
        "google/shieldgemma-2b",
        "shieldgemma",
        gpu="~6 GB bf16 (gated: accept the licence on the hub)",
        about="ShieldGemma 2B, one Yes/No question per harm policy (4), P(Yes) max, no generation",
    ),
    "sd-1.5": _open_weights(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        steps=50,
        guidance=7.5,
        height=512,
        width=512,
        dtype="float16",
        gpu="~4 GB fp16",
        about="Stable Diffusion 1.5, 512 px, 50 steps, CFG 7.5 (no checker; add >safety_checker)",
    ),
    "sd-2.1": _open_weights(
        "stabilityai/stable-diffusion-2-1",
        steps=50,
        guidance=7.5,
        height=768,
        width=768,
        dtype="float16",
        gpu="~5 GB fp16",
        about="Stable Diffusion 2.1 (v-prediction), 768 px, 50 steps, CFG 7.5",
    ),
    "sdxl": _open_weights(
        "stabilityai/stable-diffusion-xl-base-1.0",
        steps=50,
        guidance=5.0,
        height=1024,
        width=1024,
        dtype="float16",
        variant="fp16",
        gpu="~10 GB fp16",
        about="SDXL base 1.0 (two CLIP text encoders), 1024 px, 50 steps, CFG 5.0, no refiner",
    ),
    "sd-3.5-large": _open_weights(
        "stabilityai/stable-diffusion-3.5-large",
        steps=28,
        guidance=3.5,
        height=1024,
        width=1024,
        dtype="bfloat16",
        gpu="~28 GB bf16 (T5-XXL kept)",
        about="SD 3.5 Large MMDiT with all three text encoders (T5 kept, unlike OVERT's run), 28 steps, CFG 3.5",
    ),
    "flux-schnell": _open_weights(
        "black-forest-labs/FLUX.1-schnell",
        steps=4,
        guidance=0.0,
        height=1024,
        width=1024,
        max_sequence_length=256,
        dtype="bfloat16",
        gpu="~34 GB bf16",
        about="FLUX.1 [schnell], timestep-distilled: 4 steps, guidance 0, 256 T5 tokens",
    ),
    "flux-dev": _open_weights(
        "black-forest-labs/FLUX.1-dev",
        steps=50,
        guidance=3.5,
        height=1024,
        width=1024,
        max_sequence_length=512,
        dtype="bfloat16",
        gpu="~34 GB bf16 (gated: accept the licence on the hub)",
        about="FLUX.1 [dev], guidance-distilled (guidance 3.5 is an input, not CFG), 50 steps",
    ),
    "dall-e-3": _api(
        "openai-images",
        "OPENAI_API_KEY",
        "OpenAI DALL-E 3 API (its own prompt rewriting and moderation inside)",
        model="dall-e-3",
    ),
    "gpt-image-1": _api(
        "openai-images",
        "OPENAI_API_KEY",
        "OpenAI gpt-image-1 API (moderation inside the API)",
        model="gpt-image-1",
    ),
    "imagen-3": _api(
        "imagen",
        "GEMINI_API_KEY",
        "Google Imagen 3 through the Gemini API (its safety filters inside)",
        model="imagen-3.0-generate-002",
    ),
    "flux-pro-1.1": _api(
        "fal",
        "FAL_KEY",
        "FLUX1.1 [pro] on fal.ai, safety_tolerance 2 (fal's default; 1 strictest, 6 most permissive)",
        model="fal-ai/flux-pro/v1.1",
        safety_tolerance=2,
    ),
}


def preset_needs(name: str) -> str:
    """One line for `t2i-eval list`: what preset `name` needs before it runs.

    Example: `pip install 't2i-eval[diffusers]'; weights stabilityai/sdxl-...; GPU ~12 GB fp16`.
    """
    if name not in PRESETS:
        raise UserError(f"Unknown preset '{name}'.{did_you_mean(name, list(PRESETS))}")
    needs = {k: None for k in NEEDS_KEYS} | PRESETS[name].get("needs", {})
    parts = []
    if needs["extra"]:
        parts.append(f"pip install 't2i-eval[{needs['extra']}]'")
    if needs["weights"]:
        parts.append(f"weights {needs['weights']} (hub, on first use)")
    if needs["key_env"]:
        parts.append(f"API key in ${needs['key_env']}")
    if needs["gpu"]:
        parts.append(f"GPU {needs['gpu']}")
    return "; ".join(parts) or "nothing beyond the core install"
