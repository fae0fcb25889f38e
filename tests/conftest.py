"""Test environment: offline, one torch thread, a per-session cache for the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

SHARED_OVERT = Path(__file__).resolve().parents[2] / "shared" / "data" / "overt"
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the tiny model once per session in a temp cache unless the user set one."""
    if "T2I_EVAL_CACHE" not in os.environ:
        os.environ["T2I_EVAL_CACHE"] = str(tmp_path_factory.mktemp("t2i-cache"))


@pytest.fixture
def overt_dir() -> Path:
    if not (SHARED_OVERT / "OVERT_mini.csv").exists():
        pytest.skip("../shared/data/overt not present")
    return SHARED_OVERT


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that opens a connection beyond this machine (loopback and Unix sockets ok)."""
    import socket

    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random-weight GPT-2 with a word-level tokenizer and a chat template, saved
    and loaded back like a hub model: the `llm` rewriter's transformers backend, offline."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "system", "user", "assistant", ":", "a", "calm", "sea"]
    words += ["rewrite", "this", "image", "prompt", "gun", "museum", "old", "in", "the"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
        "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(words),
        n_positions=256,
        n_embd=16,
        n_layer=1,
        n_head=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    out = tmp_path_factory.mktemp("chat")
    GPT2LMHeadModel(config).save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out
