"""System specs: which prompt guards, generator and image guards make up a system under test.

Two spellings, both values only (no code in config):
- a short string: `PROMPT_GUARDS>GENERATOR[>IMAGE_GUARDS]`, each side `+`-joined, each component
  `name` or `name:model` (e.g. `blocklist>diffusers:stable-diffusion-v1-5/stable-diffusion-v1-5>safety_checker`);
  a generator token that names a preset brings the preset's stages along (`blocklist>tiny`);
  two parts whose first is one generator or preset and whose second holds only image guards read
  GENERATOR>IMAGE_GUARDS (`sdxl>safety_checker`: SDXL with the SD safety checker as a stage);
- a YAML file with keys `name`, `prompt_guards`, `generator`, `image_guards`, each component a
  name or a mapping `{name: ..., <option>: ...}`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError, did_you_mean


@dataclass(frozen=True)
class ComponentSpec:
    """One stage component: a name from the component dicts plus its options."""

    name: str
    """Key in PROMPT_GUARDS, GENERATORS or IMAGE_GUARDS."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the component's constructor."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}

    def label(self) -> str:
        model = self.options.get("model")
        return f"{self.name}:{model}" if model else self.name


@dataclass(frozen=True)
class SystemSpec:
    """A system under test: prompt guards -> generator -> image guards."""

    name: str
    """Used in run ids and report rows."""
    generator: ComponentSpec
    """Makes the image (or refuses, for APIs)."""
    prompt_guards: tuple[ComponentSpec, ...] = ()
    """Text filters run before generation, in order."""
    image_guards: tuple[ComponentSpec, ...] = ()
    """Image filters run on the generated image, in order."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prompt_guards": [c.to_dict() for c in self.prompt_guards],
            "generator": self.generator.to_dict(),
            "image_guards": [c.to_dict() for c in self.image_guards],
        }

    @property
    def digest(self) -> str:
        """Hash of everything that changes results (not the name)."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


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


def _names(side: str) -> list[str]:
    """Component names on one side of `>` (`a:model+b` -> [a, b])."""
    return [c.strip().partition(":")[0] for c in side.split("+") if c.strip()]


def _is_prompt_guard(name: str) -> bool:
    """A bare prompt-guard name as a whole system means `<guard>>guards-only`."""
    from . import PROMPT_GUARDS  # the one list of names (import here: it imports us)

    return name in PROMPT_GUARDS


def _is_generator_then_image_guards(first: str, second: str) -> bool:
    """`sdxl>safety_checker`: one generator or preset, then only image guards.

    Two parts normally read PROMPT_GUARDS>GENERATOR; they read GENERATOR>IMAGE_GUARDS only when
    that is the sole sensible reading, so a misspelt guard still gets "Unknown prompt guard".
    """
    from . import GENERATORS, IMAGE_GUARDS

    gens, guards = _names(first), _names(second)
    return (
        len(gens) == 1
        and (gens[0] in GENERATORS or (gens[0] in PRESETS and gens[0] != "default"))
        and not _is_prompt_guard(gens[0])
        and bool(guards)
        and all(g in IMAGE_GUARDS for g in guards)
    )


_SPEC_KEYS = {"name", "prompt_guards", "generator", "image_guards"}
#: Keys a layout may carry for people and `t2i-eval list`; they never change results.
_DOC_KEYS = {"about", "needs"}


def _component(value: Any, where: str) -> ComponentSpec:
    if isinstance(value, str):
        name, colon, model = value.strip().partition(":")
        if not name:
            raise UserError(f"{where}: empty component name")
        if colon and not model.strip():
            raise UserError(f"{where}: empty model after '{name}:' (give NAME or NAME:MODEL)")
        return ComponentSpec(name, {"model": model} if model else {})
    if isinstance(value, dict):
        if "name" not in value:
            raise UserError(
                f"{where}: component mapping needs a 'name' key (found {sorted(value)})"
            )
        name = value["name"]
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: component 'name' must be text, found {type(name).__name__}")
        bad_keys = [type(k).__name__ for k in value if not isinstance(k, str)]
        if bad_keys:
            raise UserError(f"{where} '{name}': option names must be text, found {bad_keys[0]}")
        opts = {k: v for k, v in value.items() if k != "name"}
        return ComponentSpec(name.strip(), opts)
    raise UserError(f"{where}: expected a component name or mapping, found {type(value).__name__}")


def _from_layout(name: str, layout: dict[str, Any], where: str) -> SystemSpec:
    unknown = set(layout) - _SPEC_KEYS - _DOC_KEYS
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_SPEC_KEYS))})"
        )
    if "generator" not in layout:
        raise UserError(f"{where}: missing key 'generator'")
    for key in ("prompt_guards", "image_guards"):
        if not isinstance(layout.get(key, []), list):
            raise UserError(f"{where}: '{key}' must be a list")
    name = layout.get("name", name)
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise UserError(f"{where}: 'name' must be text of 1 to 200 characters")
    return SystemSpec(
        name=name,
        generator=_component(layout["generator"], f"{where} generator"),
        prompt_guards=tuple(
            _component(c, f"{where} prompt_guards[{i}]")
            for i, c in enumerate(layout.get("prompt_guards", []))
        ),
        image_guards=tuple(
            _component(c, f"{where} image_guards[{i}]")
            for i, c in enumerate(layout.get("image_guards", []))
        ),
    )


def parse_system(ref: str) -> SystemSpec:
    """A preset name, a short string, or a YAML file path -> SystemSpec."""
    ref = ref.strip()
    if not ref:
        raise UserError("empty system spec; try --system default (see `t2i-eval list`)")
    if ref.endswith((".yaml", ".yml")):
        return _load_yaml(Path(ref))
    if ref in PRESETS:
        return _from_layout(ref, PRESETS[ref], f"preset '{ref}'")
    parts = ref.split(">")
    if len(parts) > 3 or any(not p.strip() for p in parts):
        raise UserError(
            f"system '{ref}': expected PROMPT_GUARDS>GENERATOR[>IMAGE_GUARDS] with non-empty parts, "
            "e.g. blocklist>tiny or blocklist>diffusers:MODEL>safety_checker"
        )
    if len(parts) == 1 and all(_is_prompt_guard(n) for n in _names(parts[0])):
        guards, gen, image = parts[0], "guards-only", ""  # `concept` = concept>guards-only
    elif len(parts) == 1:
        guards, gen, image = "", parts[0], ""
    elif len(parts) == 2 and _is_generator_then_image_guards(*parts):
        guards, gen, image = "", parts[0], parts[1]  # `sdxl>safety_checker`
    elif len(parts) == 2:
        guards, gen, image = parts[0], parts[1], ""
    else:
        guards, gen, image = parts
    for side in (guards, gen, image):
        if side and any(not g.strip() for g in side.split("+")):
            raise UserError(
                f"system '{ref}': an empty component around '+'; join names as a+b (e.g. "
                "blocklist+profanity>tiny)"
            )
    prompt_guards = [_component(g, f"system '{ref}'") for g in guards.split("+") if g.strip()]
    image_guards = [_component(g, f"system '{ref}'") for g in image.split("+") if g.strip()]
    gen = gen.strip()
    if gen in PRESETS and gen != "default":
        preset = _from_layout(gen, PRESETS[gen], f"preset '{gen}'")
        return SystemSpec(
            name=ref,
            generator=preset.generator,
            prompt_guards=(*prompt_guards, *preset.prompt_guards),
            image_guards=tuple(image_guards) or preset.image_guards,
        )
    return SystemSpec(
        name=ref,
        generator=_component(gen, f"system '{ref}'"),
        prompt_guards=tuple(prompt_guards),
        image_guards=tuple(image_guards),
    )


def _load_yaml(path: Path) -> SystemSpec:
    from ..paths import load_yaml

    data = load_yaml(path, "system spec")
    if not isinstance(data, dict):
        raise UserError(f"system spec {path}: expected a mapping with keys {sorted(_SPEC_KEYS)}")
    return _from_layout(path.stem, data, f"system spec {path}")


def spec_from_manifest(system: dict[str, Any]) -> SystemSpec:
    """The SystemSpec a run recorded in its manifest (to run it again, e.g. on rewrites)."""
    layout = {k: system[k] for k in ("prompt_guards", "generator", "image_guards") if k in system}
    return _from_layout(str(system.get("name", "system")), layout, "run manifest system")
