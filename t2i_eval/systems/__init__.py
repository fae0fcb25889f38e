"""Systems under test: prompt guards -> generator -> image guards, assembled from a spec.

The component dicts live in `registry.py` (name -> "module:Class", imported lazily), the spec
grammar in `spec.py`, the documented presets in `presets.py`, the runtime that runs a batch
through the stages in `chain.py`. This module checks a spec and builds a `System` from it.

How to add a component (one new file + one line in `registry.py`; nothing else names it):

- A prompt guard: `systems/<name>.py` with a class whose constructor keywords are its spec
  options (type-hinted: `options.check_values` checks them before any run directory exists).
  Class attributes `name` (the registered name; stage decisions and `refused_by` carry it) and
  `weights` ("pretrained", "random", "rules", "fake", ...: reports label random weights).
  `info() -> dict` (what the manifest records: model, thresholds, version, the rule).
  `check(texts) -> list[StageDecision]`, one per text, stage "prompt_guard": `refused`
  True/False, `score` and `threshold` (refuse when score > threshold) and `raw` holding every
  number a later threshold sweep needs. If a guard has a threshold, give it a pure `decide`
  function over those stored numbers (as `safety_checker.decide`). Register:
  `PROMPT_GUARDS["<name>"] = "t2i_eval.systems.<name>:<Class>"`.
- A generator: the same `name`, `weights`, `info()`, plus `generate(texts, seeds) ->
  list[GeneratorResult]`: `GeneratorResult(StageDecision("generator", name, False, raw=...),
  image)` for an image, or a decision with `refused=True` and the model's own message (no
  image) for a policy refusal. `produces_images = False` marks a generator that stops after
  the prompt stage (`guards-only`). A classmethod `check_options(**options)`, if present, runs
  when the spec is validated (cheap, sends nothing). Register in `GENERATORS`.
- An image guard: as a prompt guard, but `check(images) -> list[StageDecision]` on PIL images,
  stage "image_guard"; a refused image is delivered black, as diffusers' built-in checker does.
  Register in `IMAGE_GUARDS`.
- An image API provider: `systems/api/<provider>.py` with a `@dataclass(kw_only=True,
  eq=False)` subclass of `api.base.KeyedAPI` (a hosted API whose key sits in an environment
  variable) or `ImageAPI`: ClassVars `name` and `provider`, option fields with docstrings,
  `_validate(v)`, the `endpoint` property, `_body(text, seed)` and `_parse(resp) -> Outcome`
  (refused True with the provider's words, False with the image, None for an answer that
  cannot be used such as a configuration error; raise `TransientError` for a malformed body,
  which is retried). Register in `GENERATORS`; `t2i-eval list` finds it (`api.api_providers`).

Refusal versus error, for every kind (`chain._apply`): a refusal is a result, a decision with
`refused=True`. "Could not check" is never a refusal: return a decision with `refused=None`
and a message (the item becomes an error, excluded from rates and retried on resume), or raise
(the batch is retried item by item; out-of-memory halves the batch). Every decision keeps its
raw scores, refused or not. `tests/test_contracts_systems.py` runs each of these rules over
every entry of the three dicts and fails for an entry it has no offline build for.

Every guard also takes `on_error: error | pass | refuse` (fail-open or fail-closed when it
cannot check), with no code in the guard: `options.chain_options` splits it off the spec and
`chain.System` applies it (its docstring says how such decisions are recorded and counted).
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import UserError
from .chain import System
from .options import chain_options, check_values
from .presets import PRESETS
from .registry import GENERATORS, IMAGE_GUARDS, KINDS, PROMPT_GUARDS, resolve
from .spec import ComponentSpec, SystemSpec, parse_system

__all__ = [
    "GENERATORS",
    "IMAGE_GUARDS",
    "KINDS",
    "PRESETS",
    "PROMPT_GUARDS",
    "ComponentSpec",
    "System",
    "SystemSpec",
    "build_component",
    "build_system",
    "checked_class",
    "parse_system",
    "resolve",
    "validate_spec",
]


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
        options, _ = chain_options(kind, comp.name, comp.options)
        cls = checked_class(kind, ComponentSpec(comp.name, options))
        check = getattr(cls, "check_options", None)
        if check is not None:  # cheap, sends nothing, needs no key (the API generators)
            check(**options)
        check_values(kind, comp.name, cls, options)


def build_component(kind: str, spec: ComponentSpec) -> Any:
    """Instantiate one component from its spec (this loads its model); options the chain
    handles (`on_error`) are not the component's and are left out."""
    options, _ = chain_options(kind, spec.name, spec.options)
    cls = checked_class(kind, ComponentSpec(spec.name, options))
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:  # a bad option value, named by the component
        raise UserError(f"{kind} '{spec.name}': bad option value ({e})") from None


def build_system(spec: SystemSpec) -> System:
    """Instantiate every component (this loads models), with each guard's `on_error`."""
    built: dict[str, list[Any]] = {kind: [] for kind in KINDS}
    on_error = {}
    for kind, comp in _stages(spec):
        built[kind].append(build_component(kind, comp))
        policy = chain_options(kind, comp.name, comp.options)[1]
        on_error[f"{kind.replace(' ', '_')}:{comp.name}"] = policy
    return System(
        name=spec.name,
        prompt_guards=built["prompt guard"],
        generator=built["generator"][0],
        image_guards=built["image guard"],
        on_error=on_error,
    )
