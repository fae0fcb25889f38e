"""FLUX1.1 [pro] on fal (`fal-ai/flux-pro/v1.1`) as a generator.

`has_nsfw_concepts[i]` true means fal's safety checker replaced image i with a black one; a 422
whose `detail[].type` is `content_policy_violation` is a refusal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from ...net import Response, TransientError
from .base import KeyedAPI, NoImage, Options, Outcome

_FAL_SIZES = (
    "square_hd",
    "square",
    "portrait_4_3",
    "portrait_16_9",
    "landscape_4_3",
    "landscape_16_9",
)


@dataclass(kw_only=True, eq=False)
class FalFlux(KeyedAPI):
    """FLUX1.1 [pro] on fal (`fal-ai/flux-pro/v1.1`), synchronous endpoint; the seed is sent."""

    name: ClassVar[str] = "fal"
    provider: ClassVar[str] = "fal"
    key_prefix: ClassVar[str] = "Key "
    sends_seed: ClassVar[bool] = True

    model: str = "fal-ai/flux-pro/v1.1"
    base_url: str = "https://fal.run"
    api_key_env: str | None = "FAL_KEY"
    safety_tolerance: int = 2
    """1 (strictest) .. 6 (most permissive); API-only setting of the FLUX pro models."""
    enable_safety_checker: bool = True
    """fal's image safety checker: a flagged image comes back black with has_nsfw_concepts."""
    image_size: str | None = None
    """square_hd | square | portrait_4_3 | portrait_16_9 | landscape_4_3 | landscape_16_9."""
    sync_mode: bool = True
    """Ask for the image inline (data URI) instead of a CDN URL to download."""

    def _validate(self, v: Options) -> None:
        v.integer("safety_tolerance", self.safety_tolerance, minimum=1, maximum=6)
        v.boolean("enable_safety_checker", self.enable_safety_checker)
        v.choice("image_size", self.image_size, _FAL_SIZES)
        v.boolean("sync_mode", self.sync_mode)

    @property
    def endpoint(self) -> str:
        return f"{self.base_url.rstrip('/')}/{self.model}"

    def _body(self, text: str, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": text,
            "seed": seed,
            "num_images": 1,
            "safety_tolerance": str(self.safety_tolerance),  # the API's enum is "1".."6"
            "enable_safety_checker": self.enable_safety_checker,
            "sync_mode": self.sync_mode,
        }
        if self.image_size is not None:
            body["image_size"] = self.image_size
        return body

    def _options(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("safety_tolerance", "enable_safety_checker", "image_size", "sync_mode")
        }

    def _parse(self, resp: Response) -> Outcome:
        if resp.status >= 400:
            detail = _fal_detail(resp)
            types = [d.get("type") for d in detail]
            messages = [str(d.get("msg", "")) for d in detail if d.get("msg")]
            raw = {"error_types": types}
            if "content_policy_violation" in types:
                i = types.index("content_policy_violation")
                return Outcome(
                    True, str(detail[i].get("msg") or "content_policy_violation"), raw=raw
                )
            message = "; ".join(messages) or resp.snippet()
            return Outcome(None, f"HTTP {resp.status}: {message}", raw=raw)
        body = resp.json()
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
            raise TransientError("malformed body: no 'images' list")
        nsfw = body.get("has_nsfw_concepts") or []
        raw = {"has_nsfw_concepts": nsfw, "provider_seed": body.get("seed")}
        if not images:
            return Outcome(True, "fal returned no image", raw={**raw, "missing_image": True})
        if isinstance(nsfw, list) and nsfw and nsfw[0] is True:
            return Outcome(
                True,
                "fal's safety checker flagged the image (has_nsfw_concepts: true) and returned "
                "a black image in its place",
                raw=raw,
            )
        url = images[0].get("url")
        if not isinstance(url, str) or not url:
            raise TransientError("malformed body: image without a 'url' string")
        try:
            return Outcome(False, image=self._image_at(url), raw=raw)
        except NoImage as e:
            return Outcome(None, str(e), raw=raw)


def _fal_detail(resp: Response) -> list[dict[str, Any]]:
    """fal's error body: `{"detail": [{"loc", "msg", "type", ...}]}` (or a plain string)."""
    try:
        body = json.loads(resp.body)
    except (ValueError, UnicodeDecodeError):
        return []
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return [{"msg": detail}]
    return [d for d in detail if isinstance(d, dict)] if isinstance(detail, list) else []
