"""Presets (open-weights and API), the GENERATOR>IMAGE_GUARDS spelling, and the diffusers
generator on tiny random pipelines of each family (SD, SDXL, SD3 with T5, FLUX), offline."""

import importlib.util
import inspect
import json
import string
from types import SimpleNamespace

import pytest
from helpers import write_suite
from PIL import Image

from t2i_eval.errors import UserError
from t2i_eval.systems import GENERATORS, PRESETS, parse_system, validate_spec
from t2i_eval.systems.presets import NEEDS_KEYS, preset_needs
from t2i_eval.systems.tiny import TINY_CLIP_TEXT

OPEN_WEIGHTS = {
    "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2.1": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd-3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
}
API = {
    "dall-e-3": ("openai-images", "dall-e-3", "OPENAI_API_KEY"),
    "gpt-image-1": ("openai-images", "gpt-image-1", "OPENAI_API_KEY"),
    "imagen-3": ("imagen", "imagen-3.0-generate-002", "GEMINI_API_KEY"),
    "flux-pro-1.1": ("fal", "fal-ai/flux-pro/v1.1", "FAL_KEY"),
}


# presets and their `needs` (no torch) -------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_parses_and_says_what_it_needs(name):
    spec = parse_system(name)
    assert spec.name == name
    assert set(PRESETS[name]["needs"]) == set(NEEDS_KEYS)
    assert PRESETS[name]["about"].strip()
    validate_spec(spec)  # names and options exist (no model load)


@pytest.mark.parametrize("name,model", OPEN_WEIGHTS.items())
def test_open_weights_presets_pin_model_card_settings(name, model):
    gen = parse_system(name).generator
    assert gen.name == "diffusers" and gen.options["model"] == model
    assert {"steps", "guidance", "height", "width", "dtype"} <= set(gen.options)
    assert "trust_remote_code" not in gen.options and "text_encoder_3" not in gen.options
    assert parse_system(name).image_guards == ()  # these pipelines ship no checker
    line = preset_needs(name)
    assert "pip install 't2i-eval[diffusers]'" in line and model in line and "GPU ~" in line


def test_flux_schnell_is_four_steps_without_guidance():
    opts = parse_system("flux-schnell").generator.options
    assert (opts["steps"], opts["guidance"], opts["max_sequence_length"]) == (4, 0.0, 256)


@pytest.mark.parametrize("name,expected", API.items())
def test_api_presets_name_provider_model_and_key(name, expected):
    generator, model, key = expected
    gen = parse_system(name).generator
    assert (gen.name, gen.options["model"]) == (generator, model)
    assert preset_needs(name) == f"API key in ${key}"
    assert generator in GENERATORS


def test_flux_pro_keeps_fal_safety_tolerance():
    assert parse_system("flux-pro-1.1").generator.options["safety_tolerance"] == 2


def test_preset_needs_lines_for_offline_presets():
    assert preset_needs("fake") == "nothing beyond the core install"
    assert preset_needs("tiny") == "pip install 't2i-eval[diffusers,clip]'"
    assert preset_needs("guards") == "pip install 't2i-eval[guards]'"
    with pytest.raises(UserError, match="Unknown preset 'sdx'. Did you mean 'sdxl'"):
        preset_needs("sdx")


# GENERATOR>IMAGE_GUARDS ------------------------------------------------------------------------


def test_preset_then_image_guard_reads_generator_then_checker():
    spec = parse_system("sdxl>safety_checker")
    assert spec.prompt_guards == ()
    assert spec.generator == parse_system("sdxl").generator
    assert [(c.name, c.options) for c in spec.image_guards] == [("safety_checker", {})]
    validate_spec(spec)
    from t2i_eval.systems.safety_checker import SafetyCheckerGuard

    # no model option: the guard's default, the real SD checker
    default = inspect.signature(SafetyCheckerGuard).parameters["model"].default
    assert default == "CompVis/stable-diffusion-safety-checker"


def test_generator_then_image_guard_and_old_spellings_unchanged():
    s = parse_system("diffusers:org/m>safety_checker:some/checker")
    assert s.generator.options == {"model": "org/m"} and s.prompt_guards == ()
    assert s.image_guards[0].options == {"model": "some/checker"}
    s = parse_system("blocklist>flux-dev>safety_checker")
    assert [c.name for c in s.prompt_guards] == ["blocklist"]
    assert s.generator.options["model"] == OPEN_WEIGHTS["flux-dev"]
    assert parse_system("blocklist>fake").prompt_guards[0].name == "blocklist"
    with pytest.raises(UserError, match="Unknown prompt guard 'blocklst'"):
        validate_spec(parse_system("blocklst>safety_checker"))
    with pytest.raises(UserError, match="Unknown generator 'safety_checker'"):
        validate_spec(parse_system("blocklist>safety_checker"))


# tiny pipelines of each family (torch) ---------------------------------------------------------

needs_torch = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "diffusers", "open_clip")),
    reason="needs t2i-eval[diffusers,clip]",
)

#: Shared by every CLIP text encoder below: the real SD vocabulary size, tiny everything else.
CLIP_TEXT = TINY_CLIP_TEXT
HEIGHT, WIDTH = 32, 48  # not square, so a swapped height/width shows


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over letters: no hub and no sentencepiece model needed."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase]
    vocab += [("▁" + c, -3.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5_encoder(d_model):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config)


def _clip(cls):
    import torch
    from transformers import CLIPTextConfig

    torch.manual_seed(0)
    return cls(CLIPTextConfig(**CLIP_TEXT))


def _flow_vae(latent_channels):
    """The one-block VAE diffusers' SD3 and FLUX tests use (scale factor 1)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _sdxl(tok):
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 size/crop ids * 8 + pooled 32
        cross_attention_dim=64,  # the two encoders' hidden states, concatenated
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=2,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_clip(CLIPTextModel),
        text_encoder_2=_clip(CLIPTextModelWithProjection),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading"),
    )


def _sd3(tok):
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # = T5 d_model = both CLIP hidden states side by side
        pooled_projection_dim=64,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_flow_vae(4),
        text_encoder=_clip(CLIPTextModelWithProjection),
        text_encoder_2=_clip(CLIPTextModelWithProjection),
        text_encoder_3=_t5_encoder(64),
        tokenizer=tok,
        tokenizer_2=tok,
        tokenizer_3=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _flux(tok):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 1 latent channel, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,  # FLUX.1-dev's kind; schnell has none
    )
    return FluxPipeline(
        transformer=transformer,
        vae=_flow_vae(1),
        text_encoder=_clip(CLIPTextModel),
        text_encoder_2=_t5_encoder(32),
        tokenizer=tok,
        tokenizer_2=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


#: family -> (builder, generator options beyond steps/size, expected pipeline, text encoders)
FAMILIES = {
    "sd": (
        None,  # the package's own tiny SD folder
        {"negative_prompt": "blurry"},
        "StableDiffusionPipeline",
        {"text_encoder": "CLIPTextModel"},
    ),
    "sdxl": (
        _sdxl,
        {"guidance": 5.0, "negative_prompt": "blurry"},
        "StableDiffusionXLPipeline",
        {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"},
    ),
    "sd3": (
        _sd3,
        {"guidance": 3.5, "max_sequence_length": 16},
        "StableDiffusion3Pipeline",
        {
            "text_encoder": "CLIPTextModelWithProjection",
            "text_encoder_2": "CLIPTextModelWithProjection",
            "text_encoder_3": "T5EncoderModel",
        },
    ),
    "flux": (
        _flux,
        {"guidance": 3.5, "max_sequence_length": 16},
        "FluxPipeline",
        {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"},
    ),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Each family's tiny pipeline, saved as safetensors once per module."""
    import torch

    from t2i_eval.systems.diffusers import import_diffusers
    from t2i_eval.systems.tiny import clip_tokenizer, ensure_tiny

    torch.set_num_threads(1)
    import_diffusers()
    tok = clip_tokenizer()
    dirs = {"sd": ensure_tiny()}
    for family, (build, *_) in FAMILIES.items():
        if build is not None:
            dirs[family] = tmp_path_factory.mktemp(family)
            build(tok).save_pretrained(dirs[family], safe_serialization=True)
    return dirs


@pytest.fixture(scope="module")
def generators(family_dirs):
    """family -> a DiffusersGenerator loaded from its folder by path (each loaded once)."""
    from t2i_eval.systems.diffusers import DiffusersGenerator

    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = DiffusersGenerator(
                model=str(family_dirs[name]),
                device="cpu",
                dtype="float32",
                steps=2,
                height=HEIGHT,
                width=WIDTH,
                **FAMILIES[name][1],
            )
        return loaded[name]

    return get


@pytest.fixture(params=list(FAMILIES))
def family(request, family_dirs, generators):
    """(family, its folder, its generator)."""
    return request.param, family_dirs[request.param], generators(request.param)


@needs_torch
def test_family_generates_at_requested_size_passing_only_what_it_takes(family, monkeypatch):
    name, folder, gen = family
    _, options, pipeline, encoders = FAMILIES[name]
    assert not any(p.suffix == ".bin" for p in folder.rglob("*"))
    cls = type(gen.pipe)
    real_call, seen = cls.__call__, []

    def spy(self, **kwargs):
        seen.append(kwargs)
        return real_call(self, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy)
    results = gen.generate(["a red house", "a blue car"], [0, 1])
    assert [r.image.size for r in results] == [(WIDTH, HEIGHT)] * 2
    assert all(r.decision.refused is False for r in results)
    named = {
        p.name
        for p in inspect.signature(real_call).parameters.values()
        if p.kind is not p.VAR_KEYWORD
    }
    assert set(seen[0]) <= named  # SD's __call__ takes **kwargs: a stray key would vanish
    assert seen[0]["num_inference_steps"] == 2
    if "negative_prompt" in options:
        assert seen[0]["negative_prompt"] == ["blurry", "blurry"]


@needs_torch
def test_family_info_records_what_ran(family):
    name, folder, gen = family
    _, options, pipeline, encoders = FAMILIES[name]
    info = gen.info()
    assert info["pipeline"] == pipeline and info["text_encoders"] == encoders
    assert (info["height"], info["width"], info["steps"]) == (HEIGHT, WIDTH, 2)
    assert info["trust_remote_code"] is False and info["safetensors_only"] is True
    assert info["max_sequence_length"] == options.get("max_sequence_length")
    semantics = "distilled" if name == "flux" else "classifier-free"
    assert info["guidance_semantics"].startswith(semantics)


@needs_torch
def test_unset_steps_and_guidance_take_the_pipelines_own_defaults(family):
    from t2i_eval.systems.diffusers import effective_call

    _, _, gen = family
    params = inspect.signature(type(gen.pipe).__call__).parameters
    call = effective_call(gen.pipe, {})
    assert call["num_inference_steps"] == params["num_inference_steps"].default
    assert call["guidance_scale"] == params["guidance_scale"].default


@needs_torch
def test_sd3_keeps_t5_and_uses_it(generators):
    import torch

    pipe = generators("sd3").pipe
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"

    def embed(text):
        with torch.no_grad():
            return pipe.encode_prompt(
                text, None, None, do_classifier_free_guidance=False, max_sequence_length=16
            )[0]

    a, b = embed("a cat"), embed("a dog")  # without T5, diffusers puts zeros there
    t5 = slice(-16, None)  # T5 tokens follow the 77 CLIP tokens
    assert not torch.allclose(a[:, t5], b[:, t5])


@needs_torch
def test_options_a_family_cannot_apply_are_errors(family_dirs):
    from t2i_eval.systems.diffusers import DiffusersGenerator

    with pytest.raises(UserError, match="takes no 'max_sequence_length'"):
        DiffusersGenerator(model=str(family_dirs["sd"]), device="cpu", max_sequence_length=77)
    with pytest.raises(UserError, match="negative prompt only with true CFG"):
        DiffusersGenerator(model=str(family_dirs["flux"]), device="cpu", negative_prompt="x")


def test_guidance_semantics_of_a_model_without_guidance_input():
    from t2i_eval.systems.diffusers import guidance_semantics

    schnell_like = SimpleNamespace(transformer=SimpleNamespace(config={"guidance_embeds": False}))
    assert guidance_semantics(schnell_like).startswith("ignored")


@needs_torch
def test_run_manifest_records_family_facts(family_dirs, tmp_path):
    from t2i_eval.cli import main

    system = tmp_path / "flux.yaml"
    generator = {"name": "diffusers", "model": str(family_dirs["flux"]), "device": "cpu"}
    generator |= {"dtype": "float32", "steps": 1, "guidance": 2.0, "height": 32, "width": 32}
    generator |= {"max_sequence_length": 16}
    system.write_text(json.dumps({"name": "tiny-flux", "generator": generator}))  # JSON is YAML
    suite = write_suite(tmp_path / "s.jsonl", [("a red house", "benign")])
    out = tmp_path / "run"
    argv = ["run", "--suite", str(suite), "--system", str(system), "--out", str(out), "-q"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (component,) = manifest["components"]
    info = component["info"]
    assert info["pipeline"] == "FluxPipeline" and info["text_encoders"]["text_encoder_2"]
    assert info["call"]["guidance_scale"] == 2.0 and info["call"]["max_sequence_length"] == 16
    assert info["trust_remote_code"] is False
    (record,) = [
        json.loads(x) for x in (out / "generations" / "rank-0.jsonl").read_text().splitlines()
    ]
    with Image.open(out / record["image_path"]) as img:
        assert img.size == (32, 32)


# security: safetensors only, no remote code unless asked ---------------------------------------


@needs_torch
def test_pickle_only_weights_are_refused_before_any_load(tmp_path, monkeypatch):
    import diffusers

    from t2i_eval.systems.diffusers import DiffusersGenerator

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained was called on pickle weights")

    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", never)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", never)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(UserError, match=r"unet holds weights only as pickle files .*safetensors"):
        DiffusersGenerator(model=str(tmp_path), device="cpu")


def test_pickle_beside_safetensors_is_not_refused(tmp_path):
    from t2i_eval.systems.diffusers import refuse_pickle_only

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    refuse_pickle_only(str(tmp_path))  # diffusers picks the safetensors file
    refuse_pickle_only("org/hub-id")  # not a folder: nothing to inspect, no network


@needs_torch
def test_trust_remote_code_defaults_off_and_is_passed_only_when_set(family_dirs, monkeypatch):
    import diffusers

    from t2i_eval.systems.diffusers import DiffusersGenerator

    assert inspect.signature(DiffusersGenerator).parameters["trust_remote_code"].default is False
    real, seen = diffusers.AutoPipelineForText2Image.from_pretrained, []

    def spy(model, **kwargs):
        seen.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", spy)
    folder = str(family_dirs["sd"])
    off = DiffusersGenerator(model=folder, device="cpu", steps=1)
    on = DiffusersGenerator(model=folder, device="cpu", steps=1, trust_remote_code=True)
    assert "trust_remote_code" not in seen[0] and seen[1]["trust_remote_code"] is True
    assert all(kw["use_safetensors"] is True for kw in seen)
    assert (off.info()["trust_remote_code"], on.info()["trust_remote_code"]) == (False, True)


LLM_GUARDS = {
    "llama-guard-3-1b": ("meta-llama/Llama-Guard-3-1B", "llama-guard-3"),
    "llama-guard-3-8b": ("meta-llama/Llama-Guard-3-8B", "llama-guard-3"),
    "shieldgemma-2b": ("google/shieldgemma-2b", "shieldgemma"),
}


@pytest.mark.parametrize("name,expected", LLM_GUARDS.items())
def test_llm_guard_presets_name_model_template_and_needs(name, expected):
    model, template = expected
    spec = parse_system(name)
    (guard,) = spec.prompt_guards
    assert (guard.name, guard.options["model"], guard.options["template"]) == (
        "llm-guard",
        *expected,
    )
    assert spec.generator.name == "guards-only"
    line = preset_needs(name)
    assert line.startswith("pip install 't2i-eval[diffusers]'; weights " + model)
    assert "GPU ~" in line and "gated" in line
    from t2i_eval.systems.llm_guard import load_templates

    assert template in load_templates()


def test_openai_moderation_preset_is_listed_with_its_key():
    assert preset_needs("openai-moderation") == "API key in $OPENAI_API_KEY"
