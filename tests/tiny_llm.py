"""A tiny random-weight Llama chat model for the `llm-guard` guard's local path, built offline
and saved with `save_pretrained` so the guard loads it through its real `from_pretrained` path."""

from __future__ import annotations

from pathlib import Path

#: The whole vocabulary (word level); every template's verdict words are single tokens.
GUARD_WORDS = [
    "<pad>", "<eos>", "<unk>", "user", "assistant", ":", ",", ".", "safe", "unsafe", "yes", "no",
    "Yes", "No", "Harmful", "request", "S1", "S10", "a", "cat", "gun", "knife", "lake", "violence",
]  # fmt: skip


def save_tiny_guard_lm(
    dest: Path,
    *,
    chat_template: bool = True,
    verdict_words: tuple[str, ...] = ("safe", "unsafe"),
    verdict_boost: float = 4.0,
) -> Path:
    """A 1-layer random-weight LlamaForCausalLM and its word-level tokenizer at `dest`; with a
    chat template (`user : TEXT assistant :`) unless `chat_template` is False.

    `verdict_boost` > 0 makes the verdict words the likely next tokens everywhere, as a trained
    guard's are after its prompt (the guard uses the ratio only then): hidden unit 0 is held at
    a positive constant (every embedding sets it; attention and MLP never write it), and the
    output head reads it as +boost for `verdict_words` and -boost for the rest. Which of them
    wins stays random. 0 leaves a plain random model, whose verdict words hold a crumb."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(GUARD_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
            "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
        )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(GUARD_WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        initializer_range=0.5,  # scores spread, not all near 0.5
    )
    model = LlamaForCausalLM(config)
    if verdict_boost:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 8.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[0, :] = 0.0
                layer.mlp.down_proj.weight[0, :] = 0.0
            model.lm_head.weight[:, 0] = -verdict_boost
            for w in verdict_words:
                model.lm_head.weight[vocab[w], 0] = verdict_boost
    model.save_pretrained(dest, safe_serialization=True)
    fast.save_pretrained(dest)
    return dest
