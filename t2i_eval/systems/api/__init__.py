"""Image APIs as generators, one file per provider (openai, imagen, fal, http) on `base.ImageAPI`.

To add a provider: write `<provider>.py` with an `ImageAPI` (or `KeyedAPI`) subclass and add
one line to `GENERATORS` in `systems/registry.py`; `api_providers()` (and so `t2i-eval list`)
finds it there.
"""

from __future__ import annotations

from ..registry import GENERATORS, resolve
from .base import ImageAPI, KeyedAPI, Outcome, placeholder_stats
from .fal import FalFlux
from .http import HttpImageAPI
from .imagen import Imagen
from .openai import OpenAIImages

__all__ = [
    "FalFlux",
    "HttpImageAPI",
    "ImageAPI",
    "Imagen",
    "KeyedAPI",
    "OpenAIImages",
    "Outcome",
    "api_providers",
    "placeholder_stats",
]


def api_providers() -> dict[str, str]:
    """Per registered image API generator (every `GENERATORS` entry whose class is an
    `ImageAPI`), its `t2i-eval list` line: so a new provider is listed by registering it, and
    no second list of provider names can fall out of step with the dict."""
    out = {}
    for name in GENERATORS:
        cls = resolve("generator", name)
        if isinstance(cls, type) and issubclass(cls, ImageAPI):
            out[name] = cls.listing()
    return out
