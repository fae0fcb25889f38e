"""The GPU table of docs/performance.md, measured side by side in one process on one GPU.

    # on a GPU machine, from the repository root (t2i_eval on PYTHONPATH; no hub, no network):
    python bench/gpu_table.py --out gpu_table.json        # 95 s on an H200, build included
    # how it ran on the lent H200 (diffusers and importlib_metadata carried as wheels in .whl/,
    # the tokenizer and a frozen copy of t2i_eval/ in bench/_gpu_assets/, both git-ignored):
    #   pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    #   PYTHONPATH=/tmp/site:bench/_gpu_assets/snapshot T2I_EVAL_DATA=$PWD \
    #     python3 bench/gpu_table.py --out $OUT/gpu_table.json --work /tmp
    # then, here: copy the JSON to docs/gpu_table.json and run
    #   .venv/bin/python bench/performance.py --gpu-section-only
    # here, on CPU, to prove every code path before a GPU is spent on it (tiny configs, 64 px):
    .venv/bin/python bench/gpu_table.py --tiny --out /tmp/gpu_table_tiny.json
    # once, on a machine with open_clip: the tokenizer the GPU machine cannot build itself
    .venv/bin/python bench/gpu_table.py --save-tokenizer

Why random weights: full-size Stable Diffusion 1.5 ARCHITECTURE (UNet, VAE, CLIP ViT-L/14
text encoder, ViT-L/14 safety checker) built from configs after `torch.manual_seed(0)`, so it
does the same FLOPs as the real SD-1.5 without the hub; images mean nothing, times do.
What it measures (warm-ups excluded, the device synchronised around every timing):
a) the bf16 matmul rate (8192^3, mean of 10 after 3 warm-ups): the ceiling for (c);
b) a bare diffusers loop (generate, save PNG), the baseline of `t2i-eval run`;
c) the UNet's FLOPs per step (FlopCounterMode, CFG doubles the batch) over its measured time;
d) `t2i-eval run` (its CLI entry, in this process) with and without the safety-checker stage,
   timing the generation phase and the checker from inside, so load time stays out.
`render_section` turns the JSON into the GPU section that bench/performance.py writes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# an importable t2i_eval (a pinned copy on PYTHONPATH, an install) wins over this checkout
sys.path.append(str(ROOT))
from t2i_eval.systems.tiny import TINY_CLIP_VISION  # noqa: E402  (import-light: no torch)

ASSETS = ROOT / "bench" / "_gpu_assets"  # git-ignored; travels to the GPU machine via `carry`
TOKENIZER_DIR = ASSETS / "tokenizer"
DEFAULT_JSON = ROOT / "docs" / "gpu_table.json"
COMMAND = "python bench/gpu_table.py"

for _k, _v in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
):
    os.environ.setdefault(_k, _v)

#: CLIP ViT-L/14 text tower (SD-1.5's text encoder); SD's real vocabulary and special tokens.
CLIP_TEXT_L14: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

#: Full size = SD-1.5's published configs; tiny = the shapes of t2i_eval/systems/tiny.py.
FULL: dict[str, Any] = dict(
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        sample_size=512,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ),
    text=CLIP_TEXT_L14,
    vision=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=24,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
    projection_dim=768,
    processor={},  # CLIPImageProcessor's defaults are SD's feature extractor (224 px, CLIP mean/std)
    size=512,
    steps=25,
    guidance=7.5,
    batches=(1, 8, 16),
    timed_batches={1: 4, 8: 2, 16: 2},
    unet_iters=10,
    matmul_n=8192,
    device="cuda",
    dtype="bfloat16",
)
TINY: dict[str, Any] = dict(
    FULL,
    unet=dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
    ),
    text=dict(
        CLIP_TEXT_L14,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
    ),
    vision=TINY_CLIP_VISION,
    projection_dim=32,
    processor=dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    size=64,
    steps=2,
    timed_batches={1: 2, 8: 1, 16: 1},
    unet_iters=2,
    matmul_n=256,
    device="cpu",
)


def save_tokenizer(dest: Path = TOKENIZER_DIR) -> Path:
    """SD's CLIP tokenizer, rebuilt from open_clip's BPE file (the GPU machine has no open_clip
    and no hub), saved where `carry` takes it along."""
    from t2i_eval.systems.tiny import clip_tokenizer

    clip_tokenizer().save_pretrained(dest)
    return dest


def build(cfg: dict[str, Any], pipe_dir: Path, checker_dir: Path, tokenizer_dir: Path) -> None:
    """Random-weight SD-1.5-architecture pipeline (no checker) and safety checker, each saved
    as safetensors in the folder layout t2i-eval's diffusers generator and safety_checker
    guard load. Built on the target device (fast init), saved in the target dtype."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
    )

    dtype = getattr(torch, cfg["dtype"])
    marker = json.dumps(
        {"weights": "random", "seed": 0, "note": f"SD-1.5 architecture, random weights ({COMMAND})"}
    )
    with torch.device(cfg["device"]):  # each component seeded alone, as diffusers' tests do
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg["unet"])
        torch.manual_seed(0)
        vae = AutoencoderKL(**cfg["vae"])
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(
            CLIPConfig(
                text_config=cfg["text"],
                vision_config=cfg["vision"],
                projection_dim=cfg["projection_dim"],
            )
        )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random concept directions; diffusers' own thresholds (1.0) kept
        for p in (checker.concept_embeds, checker.special_care_embeds):
            p.copy_(torch.randn(p.shape, generator=g))
    scheduler = PNDMScheduler(  # SD-1.5's scheduler config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=dtype)
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    checker.to(dtype=dtype).save_pretrained(checker_dir / "safety_checker", safe_serialization=True)
    CLIPImageProcessor(**cfg["processor"]).save_pretrained(checker_dir / "feature_extractor")
    for folder in (pipe_dir, checker_dir):
        # the generator and the guard read this marker: records and reports say "random"
        (folder / "T2I_EVAL_TINY.json").write_text(marker)


class Clock:
    """Wall time with the device drained first, so queued kernels are counted."""

    def __init__(self, torch: Any, device: str) -> None:
        self.sync: Callable[[], None] = (
            torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        )

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def matmul_rate(torch: Any, cfg: dict[str, Any], clock: Clock) -> float:
    """bf16 TFLOP/s of one large square matmul on random data: the ceiling the UNet is held to."""
    n = cfg["matmul_n"]
    g = torch.Generator(cfg["device"]).manual_seed(0)
    a, b = (
        torch.randn(n, n, device=cfg["device"], dtype=torch.bfloat16, generator=g) for _ in range(2)
    )
    for _ in range(3):
        torch.matmul(a, b)
    start = clock()
    for _ in range(10):
        torch.matmul(a, b)
    return 2 * n**3 * 10 / (clock() - start) / 1e12


def unet_rates(torch: Any, unet: Any, cfg: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """Per batch size: FLOPs of one UNet forward at the CFG batch (2B), its time, their ratio."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    dtype = getattr(torch, cfg["dtype"])
    side = cfg["size"] // 8
    text_len, width = cfg["text"]["max_position_embeddings"], unet.config.cross_attention_dim
    out: dict[str, Any] = {}
    for b in cfg["batches"]:
        g = torch.Generator(cfg["device"]).manual_seed(b)
        kw = dict(device=cfg["device"], dtype=dtype, generator=g)
        x = torch.randn(2 * b, 4, side, side, **kw)
        ctx = torch.randn(2 * b, text_len, width, **kw)
        t = torch.full((2 * b,), 500, device=cfg["device"])
        # CPU's fused attention kernel has no FLOP formula; its math path is counted as matmuls
        counted = (
            contextlib.nullcontext() if cfg["device"] != "cpu" else sdpa_kernel(SDPBackend.MATH)
        )
        with torch.inference_mode():
            counter = FlopCounterMode(display=False)
            with counted, counter:
                unet(x, t, encoder_hidden_states=ctx)
            flops = counter.get_total_flops()
            by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
            for _ in range(3):
                unet(x, t, encoder_hidden_states=ctx)
            start = clock()
            for _ in range(cfg["unet_iters"]):
                unet(x, t, encoder_hidden_states=ctx)
            sec = (clock() - start) / cfg["unet_iters"]
        out[str(b)] = {
            "cfg_batch": 2 * b,
            "flops_per_forward": flops,
            "flops_by_op": by_op,
            "seconds_per_forward": sec,
            "tflops": flops / sec / 1e12,
        }
    return out


def prompts(n: int) -> list[str]:
    from t2i_eval.suites import load_suite

    texts = [p.text for p in load_suite("core").prompts]
    return (texts * (n // len(texts) + 1))[:n]


def bare_loop(
    torch: Any, pipe: Any, cfg: dict[str, Any], clock: Clock, out: Path
) -> dict[str, Any]:
    """A bare diffusers loop as a script would write it: call the pipeline, save each PNG.
    Per batch size: one warm-up batch, then the timed ones; generation and saving timed apart."""
    res: dict[str, Any] = {}
    out.mkdir(parents=True, exist_ok=True)
    for b in cfg["batches"]:
        n_timed = cfg["timed_batches"][b]
        texts = prompts(b * (1 + n_timed))
        gen = save = 0.0
        for i in range(0, len(texts), b):
            chunk = texts[i : i + b]
            start = clock()
            images = pipe(
                prompt=chunk,
                generator=[torch.Generator().manual_seed(i + j) for j in range(len(chunk))],
                num_inference_steps=cfg["steps"],
                guidance_scale=cfg["guidance"],
                height=cfg["size"],
                width=cfg["size"],
                output_type="pil",
            ).images
            mid = time.perf_counter()
            for j, im in enumerate(images):
                im.save(out / f"{b}_{i + j}.png")
            end = time.perf_counter()
            if i:  # the first batch is the warm-up
                gen, save = gen + mid - start, save + end - mid
        n = b * n_timed
        res[str(b)] = {
            "images": n,
            "images_per_s": n / (gen + save),
            "images_per_s_generate_only": n / gen,
            "seconds_generate": gen,
            "seconds_save_png": save,
        }
    return res


@contextlib.contextmanager
def timed(owner: Any, name: str, log: list[float], clock: Clock) -> Iterator[None]:
    """Time every call of `owner.name` into `log`, for this block only (the bench's own
    instrumentation: the package is not changed)."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return original(*args, **kwargs)
        finally:
            log.append(clock() - start)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def system_yaml(path: Path, cfg: dict[str, Any], pipe_dir: Path, checker_dir: Path | None) -> Path:
    import yaml

    spec: dict[str, Any] = {
        "name": "sd15-random" + ("" if checker_dir else "-nochecker"),
        "generator": {
            "name": "diffusers",
            "model": str(pipe_dir),
            "dtype": cfg["dtype"],
            "device": cfg["device"],
            "steps": cfg["steps"],
            "guidance": cfg["guidance"],
            "height": cfg["size"],
            "width": cfg["size"],
        },
    }
    if checker_dir is not None:
        spec["image_guards"] = [
            {
                "name": "safety_checker",
                "model": str(checker_dir),
                "device": cfg["device"],
                "dtype": cfg["dtype"],
            }
        ]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def t2i_eval_run(
    cfg: dict[str, Any], system: Path, batch: int, out: Path, clock: Clock
) -> dict[str, Any]:
    """`t2i-eval run --system SYSTEM --batch-size B` through its CLI entry, in this process.

    Generation-phase wall time (the runner's batch loop: pipeline, guards, PNG writes, records)
    is taken from inside, so model loading, judging and the report stay out, as they do for the
    bare loop. The first batch is the warm-up: its generator + checker time is subtracted."""
    import t2i_eval.runner as runner
    from t2i_eval.cli import main
    from t2i_eval.systems.diffusers import DiffusersGenerator
    from t2i_eval.systems.safety_checker import SafetyCheckerGuard

    n_timed = cfg["timed_batches"][batch]
    n = batch * (1 + n_timed)
    phase: list[float] = []
    gen: list[float] = []
    chk: list[float] = []
    argv = ["run", "--system", str(system), "--suite", "core", "--limit", str(n)]
    argv += ["--batch-size", str(batch), "--out", str(out), "-q"]
    with (
        timed(runner, "_generate", phase, clock),
        timed(DiffusersGenerator, "generate", gen, clock),
        timed(SafetyCheckerGuard, "check", chk, clock),
    ):
        report = io.StringIO()  # the run's report is not what this bench prints
        with contextlib.redirect_stdout(report):
            code = main(argv)
    if code != 0 or len(phase) != 1 or len(gen) != 1 + n_timed:
        raise RuntimeError(
            f"t2i-eval {' '.join(argv)}: exit {code}, {len(phase)} generation phase(s), "
            f"{len(gen)} generator calls (expected 0, 1, {1 + n_timed})"
        )
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    # what really ran: the generator's effective call (steps, size, guidance), dtype, device
    infos = {c.get("stage"): c.get("info", {}) for c in manifest.get("components", [])}
    g_info = infos.get("generator", {})
    warm = gen[0] + (chk[0] if chk else 0.0)
    steady = phase[0] - warm
    timed_images = batch * n_timed
    return {
        "images": timed_images,
        "images_per_s": timed_images / steady,
        "seconds_phase": steady,
        "seconds_generator": sum(gen[1:]),
        "seconds_checker": sum(chk[1:]),
        "checker_share": sum(chk[1:]) / steady if chk else 0.0,
        "argv": ["t2i-eval", *argv],
        "counts": manifest.get("counts"),
        "generator": {
            k: g_info.get(k) for k in ("pipeline", "device", "dtype", "call", "attention")
        },
        "weights": sorted({str(c.get("weights")) for c in manifest.get("components", [])}),
    }


def versions(torch: Any) -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("diffusers", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def measure(
    cfg: dict[str, Any], work: Path, tiny: bool, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Every measurement in one process; `save` gets the partial result after each stage, so a
    run stopped at its time limit still leaves what it had."""
    import torch
    from diffusers import StableDiffusionPipeline

    from t2i_eval.systems.diffusers import import_diffusers

    import_diffusers()  # quiet logs and progress bars, as t2i-eval sets them
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_table: no CUDA device here; pass --tiny to test on CPU")
    clock = Clock(torch, cfg["device"])
    pipe_dir, checker_dir = work / "sd15", work / "sd15-checker"
    t0 = time.perf_counter()
    build(cfg, pipe_dir, checker_dir, TOKENIZER_DIR)
    print(f"built and saved in {time.perf_counter() - t0:.1f} s", flush=True)
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "command": COMMAND + (" --tiny" if tiny else ""),
        "tiny": tiny,
        "device": torch.cuda.get_device_name() if cfg["device"] == "cuda" else "cpu",
        "versions": versions(torch),
        "setup": {
            "weights": "random (SD-1.5 architecture: same FLOPs as the real model)",
            "dtype": cfg["dtype"],
            "size": cfg["size"],
            "steps": cfg["steps"],
            "guidance": cfg["guidance"],
            "scheduler": "PNDMScheduler (SD-1.5 config)",
            "timed_batches": {str(k): v for k, v in cfg["timed_batches"].items()},
        },
    }
    result["matmul_tflops"] = matmul_rate(torch, cfg, clock)
    print(f"bf16 matmul: {result['matmul_tflops']:.1f} TFLOP/s", flush=True)
    dtype = getattr(torch, cfg["dtype"])
    pipe = StableDiffusionPipeline.from_pretrained(
        pipe_dir, dtype=dtype, safety_checker=None, use_safetensors=True
    ).to(cfg["device"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(cfg["steps"])
    # PNDM (PLMS) calls the UNet once more than the steps asked for
    result["unet_calls_per_batch"] = len(pipe.scheduler.timesteps)
    result["matmul_n"] = cfg["matmul_n"]
    result["unet"] = unet_rates(torch, pipe.unet, cfg, clock)
    for b, u in result["unet"].items():
        u["vs_matmul"] = u["tflops"] / result["matmul_tflops"]
        print(f"unet batch {b}: {u['tflops']:.1f} TFLOP/s ({u['vs_matmul']:.0%})", flush=True)
    save(result)
    result["bare"] = bare_loop(torch, pipe, cfg, clock, work / "bare")
    save(result)
    print("bare loop:", {b: round(r["images_per_s"], 2) for b, r in result["bare"].items()})
    del pipe
    if cfg["device"] == "cuda":
        torch.cuda.empty_cache()
    with_checker = system_yaml(work / "sd15.yaml", cfg, pipe_dir, checker_dir)
    without = system_yaml(work / "sd15-nochecker.yaml", cfg, pipe_dir, None)
    result["t2i_eval"], result["t2i_eval_no_checker"] = {}, {}
    for b in cfg["batches"]:
        for key, system in (("t2i_eval_no_checker", without), ("t2i_eval", with_checker)):
            gc.collect()  # the previous run's models go before the next loads
            if cfg["device"] == "cuda":
                torch.cuda.empty_cache()
            r = t2i_eval_run(cfg, system, b, work / f"run-{key}-{b}", clock)
            result[key][str(b)] = r
            save(result)
            print(f"{key} batch {b}: {r['images_per_s']:.2f} img/s", flush=True)
    result["ratios"] = ratios(result)
    if cfg["device"] == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def ratios(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per batch size, the ratios the table reports, from the raw times (one place, used when
    measuring and when rendering, so an added ratio needs no new GPU run)."""
    out = {}
    for b in data["bare"]:
        bare, ours = data["bare"][b], data["t2i_eval_no_checker"][b]
        bare_batch_s = bare["seconds_generate"] * int(b) / bare["images"]
        unet_batch_s = data["unet"][b]["seconds_per_forward"] * data["unet_calls_per_batch"]
        out[b] = {
            # both sides generate and write PNGs (t2i-eval on a thread, the bare loop inline)
            "t2i_eval_no_checker_vs_bare": ours["images_per_s"] / bare["images_per_s"],
            # the same pipeline call on both sides: t2i-eval's generator stage vs pipe(...)
            "generator_stage_vs_bare_call": (ours["images"] / ours["seconds_generator"])
            / bare["images_per_s_generate_only"],
            "t2i_eval_with_checker_vs_bare": data["t2i_eval"][b]["images_per_s"]
            / bare["images_per_s"],
            "unet_share_of_bare": unet_batch_s / bare_batch_s,
        }
    return out


def render_section(data: dict[str, Any] | None) -> list[str]:
    """The GPU section of docs/performance.md, from gpu_table.json (None: not yet measured)."""
    head = "## GPU (full-size SD-1.5 architecture, 512x512, 25 steps, bf16)"
    if data is None:
        return [
            head,
            "",
            f"Not yet measured: no GPU machine has run `{COMMAND}` for this checkout. It builds "
            "SD-1.5's architecture with random weights (same FLOPs as the real model) and times a "
            "bare diffusers loop against `t2i-eval run` at batch 1, 8 and 16.",
            "",
            "| measure | value |",
            "|---|---|",
            "| images/s, bare loop | not yet measured |",
            "| images/s, t2i-eval | not yet measured |",
            "| UNet achieved FLOP/s vs bf16 matmul rate | not yet measured |",
            "| safety checker share of time | not yet measured |",
            "",
        ]
    bs = list(data["bare"])
    v, setup = data["versions"], data["setup"]
    size = f"{setup['size']}x{setup['size']}"

    def row(label: str, fmt: Callable[[str], str]) -> str:
        return f"| {label} | " + " | ".join(fmt(b) for b in bs) + " |"

    unet, ratio = data["unet"], ratios(data)
    lines = [
        head,
        "",
        f"Generated by `{data['command']}` on {data['device']}, {data['date']} (torch "
        f"{v.get('torch')}, diffusers {v.get('diffusers')}, transformers {v.get('transformers')}); "
        "rendered here by `python bench/performance.py --gpu-section-only` from "
        "docs/gpu_table.json. Random weights in SD-1.5's architecture (UNet, VAE, ViT-L/14 text "
        "encoder, ViT-L/14 safety checker): the same FLOPs as the real SD-1.5, so the times are "
        f"real and the images are noise. {setup['dtype']}, {size}, {setup['steps']} PNDM steps "
        f"({data['unet_calls_per_batch']} UNet calls), CFG {setup['guidance']} (the UNet runs at "
        "twice the batch). All numbers come from one process, side by side; one warm-up batch "
        "per batch size is excluded, then "
        + ", ".join(f"{data['bare'][b]['images']}" for b in bs)
        + " images are timed, with the GPU synchronised around every timing. The bare loop calls "
        "`StableDiffusionPipeline(safety_checker=None)` and saves each PNG inline. `t2i-eval "
        "run` is its CLI entry with `--system` a YAML of the diffusers generator (and the "
        "safety_checker stage on the GPU in the same dtype), timed over its generation phase: "
        "pipeline, guards, PNG writes (on a thread, overlapping the next batch) and records; "
        "model loading, judging and the report are excluded, as loading is for the bare loop. "
        "The checker's share is its stage timed alone inside the same run, not the difference "
        "of two runs (at these image counts, that difference is smaller than the noise).",
        "",
        "| measure | " + " | ".join(f"batch {b}" for b in bs) + " |",
        "|---|" + "---|" * len(bs),
        row(
            "images/s, bare diffusers loop: pipeline call + PNG save",
            lambda b: f"{data['bare'][b]['images_per_s']:.2f}",
        ),
        row(
            "images/s, bare diffusers loop: pipeline call alone",
            lambda b: f"{data['bare'][b]['images_per_s_generate_only']:.2f}",
        ),
        row(
            "images/s, `t2i-eval run` without image guard",
            lambda b: f"{data['t2i_eval_no_checker'][b]['images_per_s']:.2f}",
        ),
        row(
            "t2i-eval / bare loop, both writing PNGs (overhead; target >= 0.95)",
            lambda b: f"{ratio[b]['t2i_eval_no_checker_vs_bare']:.2f}",
        ),
        row(
            "t2i-eval's generator stage / the bare pipeline call (same work)",
            lambda b: f"{ratio[b]['generator_stage_vs_bare_call']:.2f}",
        ),
        row(
            "images/s, `t2i-eval run` with the safety_checker stage",
            lambda b: f"{data['t2i_eval'][b]['images_per_s']:.2f}",
        ),
        row(
            "safety checker share of `t2i-eval run` time",
            lambda b: f"{data['t2i_eval'][b]['checker_share']:.1%}",
        ),
        row(
            "UNet forward at the CFG batch 2B: ms",
            lambda b: f"{unet[b]['seconds_per_forward'] * 1e3:.1f}",
        ),
        row(
            "UNet GFLOP per image per step (FlopCounterMode, CFG included)",
            lambda b: f"{unet[b]['flops_per_forward'] / int(b) / 1e9:,.0f}",
        ),
        row("UNet achieved TFLOP/s", lambda b: f"{unet[b]['tflops']:.0f}"),
        row(
            f"UNet achieved / bf16 matmul rate ({data['matmul_tflops']:.0f} TFLOP/s, "
            f"{data['matmul_n']}^3 matmul)",
            lambda b: f"{unet[b]['vs_matmul']:.0%}",
        ),
        row(
            "UNet share of the bare loop's generation time (rest: text encoder, VAE, PIL)",
            lambda b: f"{ratio[b]['unet_share_of_bare']:.0%}",
        ),
        "",
    ]
    return lines


def load_json(path: Path = DEFAULT_JSON) -> dict[str, Any] | None:
    """The measured table, or None where no GPU has run (the section then says so)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return None if data.get("tiny") else data


def write_gpu_section(doc: Path, data: dict[str, Any] | None) -> None:
    """Replace the GPU section (from its heading to the end) of an existing performance.md."""
    text = doc.read_text(encoding="utf-8")
    at = text.find("\n## GPU")
    if at < 0:
        raise SystemExit(f"{doc}: no '## GPU' section to replace; run bench/performance.py")
    doc.write_text(text[: at + 1] + "\n".join(render_section(data)), encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU: proves the code path")
    ap.add_argument("--out", default=None, help="where to write the JSON (default: print only)")
    ap.add_argument("--work", default=None, help="scratch folder for models and runs")
    ap.add_argument("--save-tokenizer", action="store_true", help=f"write {TOKENIZER_DIR} and exit")
    args = ap.parse_args()
    if args.save_tokenizer:
        print(f"written: {save_tokenizer()}")
        return 0
    if not (TOKENIZER_DIR / "tokenizer_config.json").is_file():
        raise SystemExit(f"gpu_table: {TOKENIZER_DIR} missing; run with --save-tokenizer first")
    cfg = TINY if args.tiny else FULL

    def save(result: dict[str, Any]) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        result = measure(cfg, Path(work), args.tiny, save)
    save(result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("t2i_eval", "bare")}))
    if args.out:
        print(f"written: {args.out}")
    print("\n".join(render_section(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
