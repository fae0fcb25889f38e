"""OpenAI Images (`/images/generations`: `dall-e-3`, `gpt-image-1`) as a generator.

An error whose code is `content_policy_violation` or `moderation_blocked` is a refusal;
`data[].b64_json` holds the image and DALL-E 3's `revised_prompt` the prompt it actually drew.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import UserError
from ...net import Response, TransientError
from .base import KeyedAPI, NoImage, Options, Outcome, decode_base64_image, error_fields

#: Documented values per known model; other models pass their options through unchecked.
_OPENAI_MODELS: dict[str, dict[str, tuple[str, ...]]] = {
    "dall-e-3": {
        "size": ("1024x1024", "1792x1024", "1024x1792"),
        "quality": ("standard", "hd"),
        "style": ("vivid", "natural"),
    },
    "gpt-image-1": {
        "size": ("auto", "1024x1024", "1536x1024", "1024x1536"),
        "quality": ("auto", "low", "medium", "high"),
        "moderation": ("auto", "low"),
    },
}
_OPENAI_POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
#: Older answers carry no code, only this documented sentence. Nothing broader: a 400 about
#: the `moderation` parameter itself is a configuration error, not a refusal.
_OPENAI_POLICY_TEXT = re.compile(
    r"your request was rejected as a result of our safety system", re.IGNORECASE
)


@dataclass(kw_only=True, eq=False)
class OpenAIImages(KeyedAPI):
    """OpenAI Images API (`dall-e-3`, `gpt-image-1`). No seed parameter exists."""

    name: ClassVar[str] = "openai-images"
    provider: ClassVar[str] = "openai"

    model: str = "dall-e-3"
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = "OPENAI_API_KEY"
    size: str | None = None
    """e.g. 1024x1024 (dall-e-3 also 1792x1024, 1024x1792; gpt-image-1 1536x1024, 1024x1536)."""
    quality: str | None = None
    """dall-e-3: standard|hd; gpt-image-1: low|medium|high|auto."""
    style: str | None = None
    """dall-e-3 only: vivid|natural."""
    moderation: str | None = None
    """gpt-image-1 only: auto|low (how strict OpenAI's moderation of the request is)."""

    def _validate(self, v: Options) -> None:
        known = _OPENAI_MODELS.get(self.model)
        for key in ("size", "quality", "style", "moderation"):
            value = getattr(self, key)
            if known is not None and value is not None and key not in known:
                models = [m for m, opts in _OPENAI_MODELS.items() if key in opts]
                raise UserError(
                    f"{self.name}: option '{key}' is not supported by {self.model} "
                    f"(only by {', '.join(models)})"
                )
            v.choice(key, value, known.get(key) if known else None)

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/images/generations"

    def _body(self, text: str, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": text, "n": 1}
        if self.model.startswith("dall-e"):
            body["response_format"] = "b64_json"  # the GPT image models always answer base64
        for key in ("size", "quality", "style", "moderation"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        return body

    def _options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("size", "quality", "style", "moderation")}

    def _parse(self, resp: Response) -> Outcome:
        if resp.status >= 400:
            err = error_fields(resp)
            code = err.get("code")
            message = str(err.get("message") or resp.snippet())
            raw = {"code": code, "error_type": err.get("type")}
            policy = code in _OPENAI_POLICY_CODES or (
                not code and resp.status == 400 and bool(_OPENAI_POLICY_TEXT.search(message))
            )
            if policy:
                return Outcome(True, message, raw=raw)
            return Outcome(None, f"HTTP {resp.status}: {message}", raw=raw)
        body = resp.json()
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise TransientError("malformed body: no 'data' list of images")
        if not data:
            return Outcome(True, "OpenAI returned no image", raw={"missing_image": True})
        item = data[0]
        raw: dict[str, Any] = {}
        if item.get("revised_prompt") is not None:
            raw["revised_prompt"] = item["revised_prompt"]
        try:
            if item.get("b64_json"):
                return Outcome(False, image=decode_base64_image(item["b64_json"]), raw=raw)
            if item.get("url"):
                if not isinstance(item["url"], str):
                    raise TransientError("malformed body: 'url' is not text")
                return Outcome(False, image=self._image_at(item["url"]), raw=raw)
        except NoImage as e:
            return Outcome(None, str(e), raw=raw)
        return Outcome(True, "OpenAI returned no image", raw={**raw, "missing_image": True})
