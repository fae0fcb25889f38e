"""Tiny random-weight model folders that several test files build: saved with
`save_pretrained` so the components load them through their real `from_pretrained` path."""

from __future__ import annotations

import shutil
from pathlib import Path

#: The classifier's whole vocabulary (word-level tokenizer); any other word is [UNK].
CLASSIFIER_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat", "gun", "knife", "blood", "lake"]


def save_tiny_classifier(dest: Path) -> Path:
    """A random-weight BERT sequence classifier (labels safe/unsafe) and its tokenizer at `dest`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(CLASSIFIER_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(CLASSIFIER_WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label={0: "safe", 1: "unsafe"},
        label2id={"safe": 0, "unsafe": 1},
    )
    BertForSequenceClassification(cfg).save_pretrained(dest, safe_serialization=True)
    fast.save_pretrained(dest)
    return dest


def checker_copy(tiny_dir: Path, dest_root: Path, weight: float) -> Path:
    """The tiny safety checker with every concept threshold set to `weight`: -1 flags every
    image (no cosine is below -1), a large value flags none. A lever for known answers."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    dest = dest_root / f"checker_{weight}"
    checker = StableDiffusionSafetyChecker.from_pretrained(tiny_dir / "safety_checker")
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(weight)
        checker.special_care_embeds_weights.fill_(weight)
    checker.save_pretrained(dest / "safety_checker")
    shutil.copytree(tiny_dir / "feature_extractor", dest / "feature_extractor")
    return dest


VIT_LABELS = {0: "normal", 1: "nsfw"}
"""The tiny ViT's labels (the shape of Falconsai/nsfw_image_detection)."""


def save_tiny_vit(dest: Path) -> Path:
    """A random-weight ViT image classifier (labels normal/nsfw, the shape of
    Falconsai/nsfw_image_detection) and its image processor at `dest`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        id2label=VIT_LABELS,
        label2id={v: k for k, v in VIT_LABELS.items()},
    )
    ViTForImageClassification(config).save_pretrained(dest, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dest)
    return dest
