"""The component dicts: every stage name -> "module:Class", imported lazily by `resolve`.

A leaf module (it imports no other module of the package), so the spec parser and the package's
assembly code can both read the names without importing each other. Registering a component is
one line here; `systems/__init__.py` says what the class must offer.
"""

from __future__ import annotations

import importlib

from ..errors import UserError, did_you_mean

PROMPT_GUARDS: dict[str, str] = {
    "blocklist": "t2i_eval.systems.blocklist:BlocklistGuard",
    "profanity": "t2i_eval.systems.text_guards:ProfanityGuard",
    "concept": "t2i_eval.systems.text_guards:ConceptGuard",
    "classifier": "t2i_eval.systems.text_guards:ClassifierGuard",
    "moderation": "t2i_eval.systems.moderation:ModerationPromptGuard",
    "probe": "t2i_eval.systems.probe_guard:ProbeGuard",
    "llm-guard": "t2i_eval.systems.llm_guard:LLMGuard",
}
GENERATORS: dict[str, str] = {
    "fake": "t2i_eval.systems.fake:FakeGenerator",
    "guards-only": "t2i_eval.systems.chain:GuardsOnly",
    "diffusers": "t2i_eval.systems.diffusers:DiffusersGenerator",
    "tiny": "t2i_eval.systems.tiny:TinyGenerator",
    "openai-images": "t2i_eval.systems.api.openai:OpenAIImages",
    "imagen": "t2i_eval.systems.api.imagen:Imagen",
    "fal": "t2i_eval.systems.api.fal:FalFlux",
    "http": "t2i_eval.systems.api.http:HttpImageAPI",
}
IMAGE_GUARDS: dict[str, str] = {
    "safety_checker": "t2i_eval.systems.safety_checker:SafetyCheckerGuard",
    "moderation": "t2i_eval.systems.moderation:ModerationImageGuard",
    "image-classifier": "t2i_eval.systems.image_classifier:ImageClassifierGuard",
}

KINDS: dict[str, dict[str, str]] = {
    "prompt guard": PROMPT_GUARDS,
    "generator": GENERATORS,
    "image guard": IMAGE_GUARDS,
}


def resolve(kind: str, name: str) -> type:
    """Import the class registered under `name` in the dict for `kind` (only now: a name's
    heavy imports, torch above all, are paid only by the systems that use it)."""
    table = KINDS[kind]
    if name not in table:
        hint = did_you_mean(name, list(table))
        raise UserError(f"Unknown {kind} '{name}'.{hint} Available: {', '.join(table)}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)
