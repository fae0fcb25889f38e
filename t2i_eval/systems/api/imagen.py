"""Google Imagen through the Gemini API (`models/MODEL:predict`) as a generator.

`predictions[].bytesBase64Encoded` holds the image; a filtered image comes back as a prediction
with `raiFilteredReason`, or not at all (no `predictions`); a prompt blocked up front is a 400
whose message cites Google's Responsible AI practices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ...net import Response, TransientError
from .base import KeyedAPI, Options, Outcome, decode_base64_image, error_fields

_IMAGEN_SAFETY = ("block_low_and_above", "block_medium_and_above", "block_only_high", "block_none")
_IMAGEN_PEOPLE = ("dont_allow", "allow_adult", "allow_all")
_IMAGEN_ASPECT = ("1:1", "3:4", "4:3", "9:16", "16:9")
#: A prompt Imagen blocks before generating is a 400 in Google's documented wording: "The
#: prompt could not be submitted. This prompt contains sensitive words that violate Google's
#: Responsible AI practices." Only those phrases count; a bare "blocked" or "safety setting"
#: is as likely to be a configuration error.
_IMAGEN_POLICY_TEXT = re.compile(
    r"could ?n[o']t be submitted|responsible ai practices|sensitive words|\bviolates?\b",
    re.IGNORECASE,
)
#: A 400 about what the key or project may use (a safety level or person setting outside its
#: allowlist, an invalid value): a configuration error to fix, never a refusal, whatever words
#: it shares with one. It would otherwise show up as a 100% refusal rate.
_IMAGEN_CONFIG_TEXT = re.compile(
    r"not allowed|allowlist|allow ?list|invalid value|not supported|is only (supported|"
    r"accessible|available)|safety_?filter_?level|safety_?setting|person_?generation",
    re.IGNORECASE,
)


@dataclass(kw_only=True, eq=False)
class Imagen(KeyedAPI):
    """Google Imagen through the Gemini API's `:predict` endpoint.

    The Gemini API takes no seed (only Vertex AI does, with watermarking off), so none is sent.
    """

    name: ClassVar[str] = "imagen"
    provider: ClassVar[str] = "google"
    key_header: ClassVar[str] = "x-goog-api-key"
    key_prefix: ClassVar[str] = ""

    model: str = "imagen-3.0-generate-002"
    base_url: str = "https://generativelanguage.googleapis.com/v1beta"
    api_key_env: str | None = "GEMINI_API_KEY"
    safety_filter_level: str | None = None
    """block_low_and_above | block_medium_and_above | block_only_high | block_none (sent as
    `safetySetting`; which levels a key may use is the provider's decision)."""
    person_generation: str | None = None
    """dont_allow | allow_adult | allow_all."""
    aspect_ratio: str | None = None
    """1:1 | 3:4 | 4:3 | 9:16 | 16:9."""

    def _validate(self, v: Options) -> None:
        v.choice("safety_filter_level", self.safety_filter_level, _IMAGEN_SAFETY)
        v.choice("person_generation", self.person_generation, _IMAGEN_PEOPLE)
        v.choice("aspect_ratio", self.aspect_ratio, _IMAGEN_ASPECT)

    @property
    def endpoint(self) -> str:
        return f"{self.base_url.rstrip('/')}/models/{self.model}:predict"

    def _body(self, text: str, seed: int) -> dict[str, Any]:
        params: dict[str, Any] = {"sampleCount": 1, "includeRaiReason": True}
        for key, api_key in (
            ("safety_filter_level", "safetySetting"),
            ("person_generation", "personGeneration"),
            ("aspect_ratio", "aspectRatio"),
        ):
            if getattr(self, key) is not None:
                params[api_key] = getattr(self, key)
        return {"instances": [{"prompt": text}], "parameters": params}

    def _options(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("safety_filter_level", "person_generation", "aspect_ratio")
        }

    def _parse(self, resp: Response) -> Outcome:
        if resp.status >= 400:
            err = error_fields(resp)
            message = str(err.get("message") or resp.snippet())
            raw = {"error_status": err.get("status")}
            policy = _IMAGEN_POLICY_TEXT.search(message) and not _IMAGEN_CONFIG_TEXT.search(message)
            if resp.status == 400 and policy:
                return Outcome(True, message, raw=raw)
            return Outcome(None, f"HTTP {resp.status}: {message}", raw=raw)
        body = resp.json()
        preds = body.get("predictions", []) if isinstance(body, dict) else None
        if not isinstance(preds, list) or not all(isinstance(p, dict) for p in preds):
            raise TransientError("malformed body: 'predictions' is not a list of objects")
        images = [p for p in preds if p.get("bytesBase64Encoded")]
        reasons = [str(p["raiFilteredReason"]) for p in preds if p.get("raiFilteredReason")]
        if images:
            first = images[0]
            raw = {k: first[k] for k in ("prompt", "safetyAttributes") if k in first}
            if "prompt" in raw:
                raw["revised_prompt"] = raw.pop("prompt")
            return Outcome(False, image=decode_base64_image(first["bytesBase64Encoded"]), raw=raw)
        if reasons:
            return Outcome(True, reasons[0], raw={"rai_filtered_reason": reasons[0]})
        return Outcome(
            True,
            "Imagen returned no image (the Gemini API leaves filtered images out of 'predictions')",
            raw={"missing_image": True},
        )
