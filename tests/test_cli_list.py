"""`t2i-eval list`: every preset and API provider with what it needs."""

from __future__ import annotations

from t2i_eval.cli import main
from t2i_eval.systems import PRESETS


def test_list_shows_every_preset_and_provider_with_its_needs(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in PRESETS:
        i = next(k for k, line in enumerate(lines) if line.split()[:1] == [name])
        assert lines[i + 1].strip().startswith("needs: "), name
    assert "weights stabilityai/stable-diffusion-3.5-large" in out
    assert "weights black-forest-labs/FLUX.1-schnell" in out
    for provider, key in (
        ("openai-images", "OPENAI_API_KEY"),
        ("imagen", "GEMINI_API_KEY"),
        ("fal", "FAL_KEY"),
    ):
        line = next(x for x in lines if x.split()[:1] == [provider])
        assert f"key ${key}" in line
    assert any(x.split()[:1] == ["http"] for x in lines)
