"""Systems under test: component dicts (name -> "module:Class", imported lazily) and assembly."""

from __future__ import annotations

import importlib
import inspect

from ..errors import UserError, did_you_mean
from .base import System
from .options import check_values
from .spec import PRESETS, ComponentSpec, SystemSpec, parse_system

PROMPT_GUARDS: dict[str, str] = {
    "blocklist": "t2i_eval.systems.blocklist:BlocklistGuard",
    "profanity": "t2i_eval.systems.text_guards:ProfanityGuard",
    "concept": "t2i_eval.systems.text_guards:ConceptGuard",
    "classifier": "t2i_eval.systems.text_guards:ClassifierGuard",
}
GENERATORS: dict[str, str] = {
    "fake": "t2i_eval.systems.fake:FakeGenerator",
    "guards-only": "t2i_eval.systems.base:GuardsOnly",
    "diffusers": "t2i_eval.systems.diffusers:DiffusersGenerator",
    "tiny": "t2i_eval.systems.tiny:TinyGenerator",
    "openai-images": "t2i_eval.systems.api:OpenAIImages",
    "imagen": "t2i_eval.systems.api:Imagen",
    "fal": "t2i_eval.systems.api:FalFlux",
    "http": "t2i_eval.systems.api:HttpImageAPI",
}
IMAGE_GUARDS: dict[str, str] = {
    "safety_checker": "t2i_eval.systems.safety_checker:SafetyCheckerGuard",
}

KINDS: dict[str, dict[str, str]] = {
    "prompt guard": PROMPT_GUARDS,
    "generator": GENERATORS,
    "image guard": IMAGE_GUARDS,
}

__all__ = [
    "GENERATORS",
    "IMAGE_GUARDS",
    "PRESETS",
    "PROMPT_GUARDS",
    "ComponentSpec",
    "System",
    "SystemSpec",
    "build_system",
    "parse_system",
    "resolve",
]


def resolve(kind: str, name: str) -> type:
    """Import the class registered under `name` in the dict for `kind`."""
    table = KINDS[kind]
    if name not in table:
        hint = did_you_mean(name, list(table))
        raise UserError(f"Unknown {kind} '{name}'.{hint} Available: {', '.join(table)}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def checked_class(kind: str, spec: ComponentSpec) -> type:
    """The component's class, after checking its options against the constructor (no model load)."""
    cls = resolve(kind, spec.name)
    params = inspect.signature(cls).parameters
    unknown = [k for k in spec.options if k not in params]
    if unknown:
        allowed = [p for p in params if p != "self"]
        raise UserError(
            f"{kind} '{spec.name}' has no option {', '.join(repr(u) for u in unknown)} "
            f"(options: {', '.join(allowed) or 'none'})"
        )
    return cls


def _stages(spec: SystemSpec) -> list[tuple[str, ComponentSpec]]:
    return [
        *(("prompt guard", c) for c in spec.prompt_guards),
        ("generator", spec.generator),
        *(("image guard", c) for c in spec.image_guards),
    ]


def validate_spec(spec: SystemSpec) -> None:
    """Check names and options without loading any model (fast, for bad-input errors).

    A stage name appears once per system: decisions, metrics and sweeps are keyed by it.
    Every option's type and range is checked here (`options.check_values`), before any run
    directory exists, so a typo never leaves a failed run folder behind. Components with a
    `check_options(**options)` classmethod (the API generators) check their own values first:
    their specs are where a user might paste a key, and the spec is written into the manifest.
    """
    for stage, comps in (("prompt guard", spec.prompt_guards), ("image guard", spec.image_guards)):
        names = [c.name for c in comps]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(
                f"system '{spec.name}': {stage} {', '.join(repr(d) for d in dup)} appears more "
                "than once; each stage name may be used once per system"
            )
    for kind, comp in _stages(spec):
        cls = checked_class(kind, comp)
        check = getattr(cls, "check_options", None)
        if check is not None:  # cheap, sends nothing, needs no key (the API generators)
            check(**comp.options)
        check_values(kind, comp.name, cls, comp.options)


def build_system(spec: SystemSpec) -> System:
    """Instantiate every component (this loads models)."""
    built = {kind: [] for kind in KINDS}
    for kind, comp in _stages(spec):
        cls = checked_class(kind, comp)
        try:
            built[kind].append(cls(**comp.options))
        except (TypeError, ValueError) as e:  # a bad option value, named by the component
            raise UserError(f"{kind} '{comp.name}': bad option value ({e})") from None
    return System(
        name=spec.name,
        prompt_guards=built["prompt guard"],
        generator=built["generator"][0],
        image_guards=built["image guard"],
    )
