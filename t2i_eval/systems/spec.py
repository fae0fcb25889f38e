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

from ..errors import UserError
from .presets import PRESETS
from .registry import GENERATORS, IMAGE_GUARDS, PROMPT_GUARDS


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


def _names(side: str) -> list[str]:
    """Component names on one side of `>` (`a:model+b` -> [a, b])."""
    return [c.strip().partition(":")[0] for c in side.split("+") if c.strip()]


def _is_prompt_guard(name: str) -> bool:
    """A bare prompt-guard name as a whole system means `<guard>>guards-only`."""
    return name in PROMPT_GUARDS


def _is_generator_then_image_guards(first: str, second: str) -> bool:
    """`sdxl>safety_checker`: one generator or preset, then only image guards.

    Two parts normally read PROMPT_GUARDS>GENERATOR; they read GENERATOR>IMAGE_GUARDS only when
    that is the sole sensible reading, so a misspelt guard still gets "Unknown prompt guard".
    """
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
