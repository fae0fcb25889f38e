"""bench/gpu_table.py's rendering: the GPU section of docs/performance.md comes from the JSON a
GPU run wrote, says "not yet measured" without one, and never shows a CPU (--tiny) trial."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_table  # noqa: E402


def sample() -> dict:
    """A result shaped like a GPU run's, with round numbers whose ratios are known."""
    per = {
        "bare": {
            "images": 16,
            "images_per_s": 4.0,
            "images_per_s_generate_only": 5.0,
            "seconds_generate": 3.2,
            "seconds_save_png": 0.8,
        },
        "plain": {
            "images": 16,
            "images_per_s": 4.4,
            "seconds_generator": 3.2,
            "checker_share": 0.0,
        },
        "checked": {
            "images": 16,
            "images_per_s": 4.2,
            "seconds_generator": 3.2,
            "checker_share": 0.02,
        },
        "unet": {
            "flops_per_forward": 8e12,
            "seconds_per_forward": 0.1,
            "tflops": 80.0,
            "vs_matmul": 0.1,
        },
    }
    return {
        "date": "2026-01-01",
        "command": "python bench/gpu_table.py",
        "tiny": False,
        "device": "Some GPU",
        "versions": {"torch": "2", "diffusers": "0.42", "transformers": "5"},
        "setup": {"dtype": "bfloat16", "size": 512, "steps": 25, "guidance": 7.5},
        "unet_calls_per_batch": 2,
        "matmul_tflops": 800.0,
        "matmul_n": 8192,
        "bare": {"8": per["bare"]},
        "t2i_eval_no_checker": {"8": per["plain"]},
        "t2i_eval": {"8": per["checked"]},
        "unet": {"8": per["unet"]},
    }


def test_ratios_come_from_the_raw_times() -> None:
    r = gpu_table.ratios(sample())["8"]
    assert round(r["t2i_eval_no_checker_vs_bare"], 6) == 1.1  # 4.4 / 4.0
    assert round(r["generator_stage_vs_bare_call"], 6) == 1.0  # (16 / 3.2) / 5.0
    assert round(r["unet_share_of_bare"], 6) == 0.125  # 2 calls x 0.1 s / (3.2 s / 2 batches)


def test_section_shows_measured_numbers_or_says_not_measured() -> None:
    text = "\n".join(gpu_table.render_section(sample()))
    assert "| measure | batch 8 |" in text
    assert "| t2i-eval / bare loop, both writing PNGs (overhead; target >= 0.95) | 1.10 |" in text
    assert "| safety checker share of `t2i-eval run` time | 2.0% |" in text
    assert "on Some GPU, 2026-01-01" in text and "not yet measured" not in text
    assert "not yet measured" in "\n".join(gpu_table.render_section(None))


def test_only_the_gpu_section_is_replaced_and_tiny_trials_are_ignored(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n## CPU\n\n| a | b |\n\n## GPU (old)\n\nold text\n")
    result = tmp_path / "gpu_table.json"
    result.write_text(json.dumps({**sample(), "tiny": True}))
    assert gpu_table.load_json(result) is None  # a CPU trial of the code path is no GPU table
    result.write_text(json.dumps(sample()))
    gpu_table.write_gpu_section(doc, gpu_table.load_json(result))
    text = doc.read_text()
    assert text.startswith("# Performance\n\n## CPU\n\n| a | b |\n\n## GPU (full-size")
    assert "old text" not in text and "| 1.10 |" in text
    assert gpu_table.load_json(tmp_path / "missing.json") is None
