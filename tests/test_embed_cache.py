"""The embedding cache: exact hits, no sharing across models, LRU bound, several writers at once,
a broken database never failing a run, and `t2i-eval cache info|clear`."""

from __future__ import annotations

import copy
import hashlib
import logging
import multiprocessing
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from t2i_eval import cli
from t2i_eval.embed_cache import (
    DB_NAME,
    MAX_MB_ENV,
    ROW_OVERHEAD,
    CachedEncoder,
    EmbeddingCache,
    cache_dir,
    cache_name,
    cached_encoder,
    entry_key,
    weights_digest,
)

DIM = 16


class FakeEncoder:
    """A deterministic stand-in for a SentenceTransformer that counts what it computes.

    Each text gets a float32 vector drawn from a generator seeded by (salt, text), so two fakes
    with different salts are two different models."""

    def __init__(self, salt: str = "") -> None:
        self.salt = salt
        self.seen: list[str] = []
        self.calls = 0

    def encode(
        self,
        texts: list[str] | str,
        normalize_embeddings: bool = False,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        self.calls += 1
        self.seen.extend(items)
        rows = []
        for t in items:
            seed = int.from_bytes(hashlib.sha256(f"{self.salt}\x1f{t}".encode()).digest()[:8])
            v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
            rows.append(v / np.linalg.norm(v) if normalize_embeddings else v)
        out = np.stack(rows) if rows else np.zeros((0, DIM), np.float32)
        return out[0] if single else out


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("T2I_EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(MAX_MB_ENV, raising=False)
    return tmp_path / "cache"


TEXTS = ["a red apple", "a man with a knife", "a quiet harbour at dawn", "two cats"]


def test_hits_equal_misses_bit_for_bit_and_a_second_call_computes_nothing(cache_home):
    fake = FakeEncoder()
    first = cached_encoder(fake, "fake", digest="d1").encode(TEXTS, normalize_embeddings=True)
    assert np.array_equal(first, FakeEncoder().encode(TEXTS, normalize_embeddings=True))
    assert first.dtype == np.float32 and fake.seen == TEXTS

    # a new wrapper and connection, as a second run would have: served from disk
    again = FakeEncoder()
    second = cached_encoder(again, "fake", digest="d1").encode(TEXTS, normalize_embeddings=True)
    assert np.array_equal(first, second) and again.calls == 0
    assert (cache_home / "embeddings" / DB_NAME).is_file()


def test_only_misses_are_computed_once_in_one_batch_in_input_order(cache_home):
    fake = FakeEncoder()
    enc = cached_encoder(fake, "fake", digest="d1")
    enc.encode(TEXTS[:2])
    mixed = ["new one", TEXTS[1], "new two", "new one", TEXTS[0]]
    got = enc.encode(mixed)
    assert fake.calls == 2 and fake.seen[2:] == ["new one", "new two"]
    assert np.array_equal(got, FakeEncoder().encode(mixed))
    one = enc.encode("two cats")
    assert one.shape == (DIM,) and np.array_equal(one, FakeEncoder().encode("two cats"))


def test_the_normalize_flag_is_part_of_the_key(cache_home):
    fake = FakeEncoder()
    enc = cached_encoder(fake, "fake", digest="d1")
    raw = enc.encode(TEXTS)
    unit = enc.encode(TEXTS, normalize_embeddings=True)
    assert fake.calls == 2 and not np.array_equal(raw, unit)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)


def test_different_encoders_or_weights_never_share_entries(cache_home):
    models = {
        ("fake", "d1"): FakeEncoder("one"),
        ("fake", "d2"): FakeEncoder("two"),  # same id, retrained weights
        ("other", "d1"): FakeEncoder("three"),  # another model, same digest string
    }
    for (name, digest), fake in models.items():
        got = cached_encoder(fake, name, digest=digest).encode(TEXTS)
        assert fake.seen == TEXTS, (name, digest)  # nothing served from another model
        assert np.array_equal(got, FakeEncoder(fake.salt).encode(TEXTS))
    keys = {entry_key(n, d, False, TEXTS[0]) for n, d in models}
    assert len(keys) == len(models)


def test_backends_of_the_same_weights_never_share_entries(cache_home, capsys):
    """An ONNX or int8 run of the same weights (same digest) computes its own vectors: int8
    moves them by ~1e-2, which must never reach a torch user through the cache."""

    class Backend(FakeEncoder):
        def __init__(self, salt: str, backend: str) -> None:
            super().__init__(salt)
            self.backend = backend  # as sentence-transformers models and OnnxSentenceEncoder say

    encoders = {b: Backend(b, b) for b in ("torch", "onnx", "onnx-int8")}
    for backend, fake in encoders.items():
        enc = cached_encoder(fake, "minilm", digest="d" * 64)
        assert enc.backend == backend and enc.name == cache_name("minilm", backend)
        got = enc.encode(TEXTS)
        assert fake.seen == TEXTS, backend  # nothing served from another backend's entries
        assert np.array_equal(got, Backend(backend, backend).encode(TEXTS))
    # torch keeps the name (and so the keys) it had before backends existed
    assert cache_name("minilm", "torch") == "minilm"
    assert cached_encoder(FakeEncoder(), "minilm", digest="d1").backend == "torch"
    assert cached_encoder(FakeEncoder(), "m", digest="d1", backend="onnx").name == "m+onnx"
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    for name in ("minilm", "minilm+onnx", "minilm+onnx-int8"):
        assert f"  {name}  weights dddddddddddd  4 entries" in out
    assert cli.main(["cache", "clear", "--encoder", "minilm+onnx-int8"]) == 0
    assert "4 entries" in capsys.readouterr().out


def test_other_encode_options_bypass_the_cache(cache_home):
    class Precise(FakeEncoder):
        def encode(self, texts, normalize_embeddings=False, batch_size=32, precision="float32"):
            out = super().encode(texts, normalize_embeddings, batch_size)
            return out if precision == "float32" else (out > 0).astype(np.uint8)

    fake = Precise()
    enc = cached_encoder(fake, "fake", digest="d1")
    enc.encode(TEXTS)
    binary = enc.encode(TEXTS, precision="binary")
    assert binary.dtype == np.uint8 and fake.calls == 2
    assert enc.encode(TEXTS).dtype == np.float32 and fake.calls == 2


def test_weights_digest_follows_every_weight_of_a_torch_model():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.weight[3, 7] += 1e-6  # one value, deep inside a tensor
    assert weights_digest(a) != weights_digest(b)
    half = copy.deepcopy(a).to(torch.bfloat16)  # no numpy twin: hashed as raw bytes
    assert weights_digest(half) != weights_digest(a)
    other = copy.deepcopy(half)
    with torch.no_grad():
        other.bias[0] += 1.0
    assert weights_digest(half) != weights_digest(other)
    with pytest.raises(TypeError, match="digest="):
        weights_digest(FakeEncoder())


def _fill(cache: EmbeddingCache, texts: list[str]) -> None:
    cached_encoder(FakeEncoder(), "fake", digest="d1", cache=cache).encode(texts)
    time.sleep(0.002)  # distinct last_used stamps between phases, whatever the clock's grain


def _held(cache: EmbeddingCache, texts: list[str]) -> set[str]:
    found = cache.get([entry_key("fake", "d1", False, t) for t in texts])
    return {t for t in texts if entry_key("fake", "d1", False, t) in found}


def test_lru_eviction_keeps_the_most_recently_used_under_the_bound(cache_home):
    row = DIM * 4 + ROW_OVERHEAD  # what one entry costs in the size account
    capacity = 100
    cache = EmbeddingCache(max_bytes=capacity * row)
    old = [f"old {i}" for i in range(60)]
    new = [f"new {i}" for i in range(60)]
    _fill(cache, old)
    _fill(cache, old[:10])  # used again: now more recent than the other 50
    for i in range(0, len(new), 10):
        _fill(cache, new[i : i + 10])
    info = cache.info()
    assert info.account_bytes <= capacity * row
    assert info.models[0].entries == info.account_bytes // row
    assert _held(cache, new) == set(new)
    assert _held(cache, old[:10]) == set(old[:10])
    evicted = set(old[10:]) - _held(cache, old[10:])
    assert evicted  # 120 entries were written into room for 100
    assert len(evicted) + info.models[0].entries == len(old) + len(new)


def test_a_zero_bound_turns_the_cache_off(cache_home, monkeypatch):
    monkeypatch.setenv(MAX_MB_ENV, "0")
    fake = FakeEncoder()
    enc = cached_encoder(fake, "fake", digest="d1")
    enc.encode(TEXTS)
    enc.encode(TEXTS)
    assert fake.calls == 2 and not cache_dir().exists()


FOLDERS, ROUNDS = 4, 12


def _writer(rank: int, root: str, barrier, results) -> None:
    """One of two processes writing the same and different texts at once, into FOLDERS fresh
    caches in turn: both also race to create each database (WAL switch, schema)."""
    bad, broken = 0, []
    for k in range(FOLDERS):
        cache = EmbeddingCache(folder=Path(root) / str(k))
        enc = cached_encoder(FakeEncoder(), "fake", digest="d1", cache=cache)
        barrier.wait()
        for r in range(ROUNDS):
            texts = [f"shared {r} {j}" for j in range(8)] + [f"rank {rank} {r}"]
            bad += not np.array_equal(enc.encode(texts), FakeEncoder().encode(texts))
        broken.append(cache.broken)
        cache.close()
    results.put((rank, bad, broken))


def test_two_processes_writing_at_once_leave_every_entry_readable(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(r, str(tmp_path), barrier, results)) for r in range(2)
    ]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    # right vectors in both, and neither process gave the cache up
    assert got == [(0, 0, [None] * FOLDERS), (1, 0, [None] * FOLDERS)]
    texts = [f"shared {r} {j}" for r in range(ROUNDS) for j in range(8)]
    texts += [f"rank {k} {r}" for k in range(2) for r in range(ROUNDS)]
    for k in range(FOLDERS):
        cache = EmbeddingCache(folder=tmp_path / str(k))
        fake = FakeEncoder()
        every = cached_encoder(fake, "fake", digest="d1", cache=cache).encode(texts)
        assert fake.calls == 0 and np.array_equal(every, FakeEncoder().encode(texts))
        (entries,) = cache.info().models
        assert entries.entries == len(texts)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "t2i_eval.embed_cache"]


def test_a_corrupt_database_falls_back_with_one_warning(cache_home, caplog):
    folder = cache_home / "embeddings"
    folder.mkdir(parents=True)
    (folder / DB_NAME).write_bytes(b"this is not a database, just bytes " * 200)
    fake = FakeEncoder()
    enc = cached_encoder(fake, "fake", digest="d1")
    with caplog.at_level(logging.WARNING):
        first = enc.encode(TEXTS)
        second = enc.encode(TEXTS)
    assert np.array_equal(first, FakeEncoder().encode(TEXTS)) and np.array_equal(first, second)
    assert fake.calls == 2
    (warning,) = _warnings(caplog)
    assert "t2i-eval cache clear" in warning and DB_NAME in warning


def test_a_database_locked_too_long_falls_back_with_one_warning(cache_home, caplog):
    cached_encoder(FakeEncoder(), "fake", digest="d1").encode(TEXTS[:1])
    holder = sqlite3.connect(cache_dir() / DB_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        fake = FakeEncoder()
        cache = EmbeddingCache(busy_timeout_s=0.2)
        enc = cached_encoder(fake, "fake", digest="d1", cache=cache)
        with caplog.at_level(logging.WARNING):
            got = enc.encode(TEXTS)
            enc.encode(TEXTS)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert np.array_equal(got, FakeEncoder().encode(TEXTS))
    assert "locked" in (cache.broken or "")
    (warning,) = _warnings(caplog)
    assert "without the cache" in warning


def test_cache_info_and_clear_through_the_cli(cache_home, capsys):
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir()) in out and "nothing cached yet" in out
    cached_encoder(FakeEncoder("a"), "minilm", digest="d" * 64).encode(TEXTS)
    cached_encoder(FakeEncoder("b"), "other", digest="e" * 64).encode(TEXTS[:2])

    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "entries: 6" in out and "MiB (T2I_EVAL_EMBED_CACHE_MAX_MB)" in out
    assert "  minilm  weights dddddddddddd  4 entries" in out
    assert "  other  weights eeeeeeeeeeee  2 entries" in out

    assert cli.main(["cache", "clear", "--encoder", "minlm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Did you mean 'minilm'?" in err

    assert cli.main(["cache", "clear", "--encoder", "minilm"]) == 0
    assert "4 entries" in capsys.readouterr().out
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "minilm" not in out and "  other  weights" in out

    assert cli.main(["cache", "clear"]) == 0
    assert "2 entries" in capsys.readouterr().out and not cache_dir().exists()


def test_cache_command_bad_input_is_one_line_exit_2(cache_home, capsys, monkeypatch):
    assert cli.main(["cache", "wipe"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice: 'wipe'" in err
    monkeypatch.setenv(MAX_MB_ENV, "lots")
    assert cli.main(["cache", "info"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{MAX_MB_ENV}='lots'" in err


def test_cache_info_on_a_corrupt_database_says_to_clear_and_clear_works(cache_home, capsys):
    folder = cache_home / "embeddings"
    folder.mkdir(parents=True)
    (folder / DB_NAME).write_bytes(b"\x00garbage" * 500)
    assert cli.main(["cache", "info"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "t2i-eval cache clear" in err
    assert cli.main(["cache", "clear"]) == 0 and not folder.exists()
    fake = FakeEncoder()
    cached_encoder(fake, "fake", digest="d1").encode(TEXTS)
    cached_encoder(fake, "fake", digest="d1").encode(TEXTS)
    assert fake.calls == 1  # caching again


class _Counting:
    """Counts the texts a real encoder is asked to embed."""

    def __init__(self, model) -> None:
        self.model, self.texts = model, 0

    def encode(self, texts, **kwargs):
        self.texts += len(texts)
        return self.model.encode(texts, **kwargs)


def test_real_minilm_hits_equal_the_uncached_model_bit_for_bit(cache_home):
    pytest.importorskip("sentence_transformers")
    from t2i_eval.systems.text_guards import load_sentence_model

    model = load_sentence_model("minilm")
    if isinstance(model, CachedEncoder):  # once text_guards routes through the cache
        model = model.model
    digest = weights_digest(model)
    assert digest == weights_digest(model) and len(digest) == 64
    texts = [*TEXTS, "a soldier cleaning a rifle", "a bowl of ramen, studio lighting"]
    plain = model.encode(texts, normalize_embeddings=True, batch_size=4)

    first = _Counting(model)
    cold = cached_encoder(first, "minilm", digest=digest).encode(
        texts, normalize_embeddings=True, batch_size=4
    )
    warm_model = _Counting(model)
    warm = cached_encoder(warm_model, "minilm", digest=digest).encode(
        texts, normalize_embeddings=True, batch_size=4
    )
    assert first.texts == len(texts) and warm_model.texts == 0
    assert cold.dtype == np.float32 and cold.shape == (len(texts), 384)
    assert np.array_equal(cold, plain) and np.array_equal(warm, plain)
