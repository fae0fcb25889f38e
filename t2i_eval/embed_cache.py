"""The embedding cache: sentence vectors kept on disk, keyed by model and exact text.

Every sentence-embedding user (the concept guard, its trigger re-scoring, trained probes, guard
training, near-duplicate search, the rewrite similarity) asks the same few encoders for the same
prompts again and again; a second run over a suite should not pay for the model a second time.
`cached_encoder(model, model_id)` wraps a loaded encoder so that its `.encode` serves what any
process computed before and computes only the rest, in one batch through the real model.

Storage: one SQLite file under `paths.cache_root() / "embeddings"` (`T2I_EVAL_CACHE` moves it).
WAL mode and a busy timeout let several processes (torchrun ranks) read and write at once, on
one host: WAL needs shared memory, so nodes sharing a network folder should each point
T2I_EVAL_CACHE at a local disk.
Entries are bounded (`T2I_EVAL_EMBED_CACHE_MAX_MB`, default DEFAULT_MAX_MB; 0 turns the cache
off) and the least recently used go first. The cache can only ever cost speed, never a run: a
corrupt, unreadable or locked-for-too-long database logs one warning and the process goes on
computing every vector itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError, did_you_mean
from .paths import cache_root

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

#: The cache's file, below `cache_dir()`.
DB_NAME = "vectors.sqlite3"
#: The bound when T2I_EVAL_EMBED_CACHE_MAX_MB is unset: ~1.4 M MiniLM vectors (384 x 4 bytes).
DEFAULT_MAX_MB = 2048.0
MAX_MB_ENV = "T2I_EVAL_EMBED_CACHE_MAX_MB"
#: What a row costs beside its vector bytes in the size account: the 32-byte key, the model id,
#: dim, dtype, last_used and SQLite's record header. An estimate; the bound is on this account.
ROW_OVERHEAD = 64
#: Eviction goes down to this share of the bound, so that it runs once per ~10% of the bound
#: written rather than on every write once the cache is full.
LOW_WATER = 0.9
#: How long a process waits for another one's write before giving the cache up for the process.
BUSY_TIMEOUT_S = 20.0

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    encoder TEXT NOT NULL,
    digest TEXT NOT NULL,
    UNIQUE (encoder, digest)
);
CREATE TABLE IF NOT EXISTS vectors (
    key BLOB PRIMARY KEY,
    model INTEGER NOT NULL REFERENCES models (id),
    dim INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    vec BLOB NOT NULL,
    last_used INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_last_used ON vectors (last_used);
CREATE INDEX IF NOT EXISTS vectors_model ON vectors (model);
CREATE TABLE IF NOT EXISTS account (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO account VALUES ('bytes', 0), ('rows', 0);
CREATE TRIGGER IF NOT EXISTS account_insert AFTER INSERT ON vectors BEGIN
    UPDATE account SET value = value + length(NEW.vec) + {ROW_OVERHEAD} WHERE name = 'bytes';
    UPDATE account SET value = value + 1 WHERE name = 'rows';
END;
CREATE TRIGGER IF NOT EXISTS account_delete AFTER DELETE ON vectors BEGIN
    UPDATE account SET value = value - length(OLD.vec) - {ROW_OVERHEAD} WHERE name = 'bytes';
    UPDATE account SET value = value - 1 WHERE name = 'rows';
END;
CREATE TRIGGER IF NOT EXISTS account_update AFTER UPDATE OF vec ON vectors BEGIN
    UPDATE account SET value = value + length(NEW.vec) - length(OLD.vec) WHERE name = 'bytes';
END;
COMMIT;
"""


def cache_dir() -> Path:
    """The embedding cache's folder: `<cache root>/embeddings`."""
    return cache_root() / "embeddings"


def max_bytes_from_env() -> int:
    """The size bound in bytes: T2I_EVAL_EMBED_CACHE_MAX_MB (MiB, decimals allowed; 0 = off)."""
    raw = os.environ.get(MAX_MB_ENV)
    if raw is None or not raw.strip():
        return int(DEFAULT_MAX_MB * 2**20)
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not math.isfinite(mb) or mb < 0:
        raise UserError(
            f"{MAX_MB_ENV}={raw!r}: expected a size in MiB >= 0 (e.g. 512, or 0 to turn the "
            "embedding cache off); fix or unset it"
        )
    return int(mb * 2**20)


def entry_key(encoder: str, digest: str, normalize: bool, text: str) -> bytes:
    """sha256 of (encoder name, weights digest, normalize flag, exact text): the entry's address.

    The encoder name carries the backend that computes the vectors (`cache_name`), so vectors
    of an ONNX or int8 run of the same weights never serve a torch one, nor the reverse.
    JSON keeps the four parts apart whatever they contain (no separator can be forged)."""
    payload = json.dumps([encoder, digest, bool(normalize), text])
    return hashlib.sha256(payload.encode("utf-8")).digest()


def weights_digest(model: Any) -> str:
    """sha256 over what decides a torch encoder's vectors: every tensor of its state dict (name,
    dtype, shape and all its bytes), its printed module stack (pooling mode, normalization) and
    its `max_seq_length` (truncation).

    Hashing the loaded tensors rather than files on disk holds for every way a model arrives
    (local folder, hub snapshot, fine-tuned in memory and saved nowhere): a changed weight
    changes the digest, so a changed model never serves another's vectors. It reads each byte
    once (~0.1 s for MiniLM's 91 MB here) and is computed once per wrapped model. Not covered:
    a tokenizer changed while the weights stay the same (tokenizers ship with their weights).
    A model without `state_dict()` (not torch) needs an explicit `digest=` in `cached_encoder`.
    """
    state_dict = getattr(model, "state_dict", None)
    if not callable(state_dict):
        raise TypeError(
            f"cannot digest the weights of a {type(model).__name__} (no state_dict()); pass "
            "digest=<a string that changes whenever its weights do> to cached_encoder"
        )
    h = hashlib.sha256()
    head = [type(model).__qualname__, repr(model), repr(getattr(model, "max_seq_length", None))]
    h.update(json.dumps(head).encode("utf-8"))
    for name, tensor in sorted(state_dict().items()):
        h.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode("utf-8"))
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def _tensor_bytes(tensor: Any) -> bytes | memoryview:
    """A tensor's raw bytes on the host, any dtype (bfloat16 has no numpy twin: viewed as bytes)."""
    if hasattr(tensor, "detach"):
        import torch

        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy())
    import numpy as np

    return memoryview(np.ascontiguousarray(tensor)).cast("B")


@dataclass(frozen=True)
class ModelEntries:
    """What the cache holds for one (encoder, weights digest)."""

    encoder: str
    """The id the encoder was wrapped with, e.g. `minilm`."""
    digest: str
    """Its weights digest (`weights_digest`)."""
    entries: int
    """Cached vectors."""
    bytes: int
    """Their share of the size account (vector bytes + ROW_OVERHEAD each)."""
    last_used: float | None
    """Unix time of the most recent use of any of them."""


@dataclass(frozen=True)
class CacheInfo:
    """`t2i-eval cache info`: where the cache is, what it holds, its bound."""

    path: Path
    """The database file."""
    exists: bool
    """False before anything was cached."""
    max_bytes: int
    """The bound (0: the cache is off)."""
    account_bytes: int
    """What the bound is compared with: vector bytes + ROW_OVERHEAD per entry."""
    disk_bytes: int
    """The database files' size on disk (WAL included); B-tree slack makes it larger than
    `account_bytes`, and space freed by eviction is reused rather than given back."""
    models: tuple[ModelEntries, ...]
    """Per (encoder, weights digest), most recently used first."""


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def describe(info: CacheInfo) -> str:
    """`t2i-eval cache info`'s text: folder, bound, entries per encoder, size on disk."""
    bound = f"{_size(info.max_bytes)} ({MAX_MB_ENV})" if info.max_bytes else f"off ({MAX_MB_ENV}=0)"
    lines = [f"embedding cache: {info.path}", f"bound: {bound}"]
    if not info.exists:
        lines.append("empty: nothing cached yet")
        return "\n".join(lines)
    total = sum(m.entries for m in info.models)
    lines.append(
        f"entries: {total:,}; whole cache: {_size(info.account_bytes)} counted against the "
        f"bound, {_size(info.disk_bytes)} on disk"
    )
    for m in info.models:
        used = (
            "-"
            if m.last_used is None
            else time.strftime("%Y-%m-%d %H:%M", time.localtime(m.last_used))
        )
        lines.append(
            f"  {m.encoder}  weights {m.digest[:12]}  {m.entries:,} entries  {_size(m.bytes)}  "
            f"last used {used}"
        )
    return "\n".join(lines)


def _now_ns() -> int:
    return time.time_ns()


class EmbeddingCache:
    """The database: get, put, evict, describe, clear. One connection per process.

    Every database call goes through `_guard`: the first failure (corrupt file, disk full, a lock
    held past `busy_timeout_s`) logs one warning and turns the cache off for this object, so a
    run never fails and never waits on a broken cache twice.
    """

    def __init__(
        self,
        folder: Path | None = None,
        max_bytes: int | None = None,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        self.folder = Path(folder) if folder is not None else cache_dir()
        self.path = self.folder / DB_NAME
        self.max_bytes = max_bytes_from_env() if max_bytes is None else int(max_bytes)
        self.busy_timeout_s = float(busy_timeout_s)
        self.broken: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.broken is None

    def _connect(self) -> sqlite3.Connection:
        """The connection, opened (and the schema made) on first use and again after a fork:
        a SQLite connection must not cross into a child process."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self.folder.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            _wal(conn, self.busy_timeout_s)
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: consistent after a crash
            conn.executescript(_SCHEMA)  # idempotent, in one transaction of its own
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _guard(self, what: str, fn: Any, fallback: Any) -> Any:
        """fn() under the lock; any database or file error -> one warning, cache off, fallback."""
        if not self.enabled:
            return fallback
        with self._lock:
            try:
                return fn()
            except (sqlite3.Error, OSError) as e:
                self.broken = f"{type(e).__name__}: {e}"
                log.warning(
                    "embedding cache %s: could not %s (%s); computing embeddings without the "
                    "cache for the rest of this process. If this repeats, run `t2i-eval cache "
                    "clear`.",
                    self.path,
                    what,
                    self.broken,
                )
                return fallback

    def _model_id(self, conn: sqlite3.Connection, encoder: str, digest: str) -> int:
        """The models row of (encoder, digest), made if new. Looked up in each write, not kept:
        another process may have cleared it (`cache clear --encoder`) since."""
        conn.execute(
            "INSERT OR IGNORE INTO models (encoder, digest) VALUES (?, ?)", (encoder, digest)
        )
        (mid,) = conn.execute(
            "SELECT id FROM models WHERE encoder = ? AND digest = ?", (encoder, digest)
        ).fetchone()
        return int(mid)

    def get(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """The cached vectors among `keys` (a missing or malformed row is a miss); marks the
        found ones used now."""
        return self._guard("read", lambda: self._get(list(dict.fromkeys(keys))), {})

    def _get(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        import numpy as np

        conn = self._connect()
        found: dict[bytes, np.ndarray] = {}
        chunk = 500  # below SQLite's limit on bound parameters
        for i in range(0, len(keys), chunk):
            part = keys[i : i + chunk]
            marks = ",".join("?" * len(part))
            rows = conn.execute(
                f"SELECT key, dim, dtype, vec FROM vectors WHERE key IN ({marks})", part
            ).fetchall()
            for key, dim, dtype, vec in rows:
                try:
                    arr = np.frombuffer(vec, dtype=np.dtype(dtype))
                except (TypeError, ValueError):
                    continue  # a malformed row: recomputed and replaced by put()
                if arr.shape == (dim,):
                    found[bytes(key)] = arr
        if found:
            now = _now_ns()
            with _transaction(conn):
                conn.executemany(
                    "UPDATE vectors SET last_used = ? WHERE key = ?", [(now, k) for k in found]
                )
        return found

    def put(self, encoder: str, digest: str, rows: Sequence[tuple[bytes, np.ndarray]]) -> None:
        """Store vectors for (encoder, digest), then evict if the account is over the bound."""
        if rows:
            self._guard("write", lambda: self._put(encoder, digest, rows), None)

    def _put(self, encoder: str, digest: str, rows: Sequence[tuple[bytes, np.ndarray]]) -> None:
        import numpy as np

        conn = self._connect()
        now = _now_ns()
        with _transaction(conn):
            mid = self._model_id(conn, encoder, digest)
            values = []
            for key, vec in rows:
                arr = np.ascontiguousarray(vec)
                values.append((key, mid, int(arr.shape[0]), arr.dtype.str, arr.tobytes(), now))
            conn.executemany(
                "INSERT INTO vectors (key, model, dim, dtype, vec, last_used) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET model = excluded.model, "
                "dim = excluded.dim, dtype = excluded.dtype, vec = excluded.vec, "
                "last_used = excluded.last_used",
                values,
            )
            self._evict(conn)

    def _evict(self, conn: sqlite3.Connection) -> int:
        """Inside the writer's transaction: over the bound, delete the least recently used rows
        down to LOW_WATER of it. Rows to delete are estimated from the mean row size."""
        used, rows = _account(conn)
        if used <= self.max_bytes or rows <= 0:
            return 0
        excess = used - LOW_WATER * self.max_bytes
        n = min(rows, max(1, math.ceil(excess / (used / rows))))
        conn.execute(
            "DELETE FROM vectors WHERE key IN (SELECT key FROM vectors ORDER BY last_used LIMIT ?)",
            (n,),
        )
        return n

    def info(self, encoder: str | None = None) -> CacheInfo:
        """What the cache holds (raises UserError when the database cannot be read)."""
        disk = sum(
            p.stat().st_size
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
            if p.is_file()
        )
        if not self.path.is_file():
            return CacheInfo(self.path, False, self.max_bytes, 0, 0, ())
        conn = self._open_for_command()
        try:
            if encoder is not None:
                self._known(conn, encoder, "info")
            used, _ = _account(conn)
            rows = conn.execute(
                "SELECT m.encoder, m.digest, count(v.key), "
                f"coalesce(sum(length(v.vec) + {ROW_OVERHEAD}), 0), max(v.last_used) "
                "FROM models m LEFT JOIN vectors v ON v.model = m.id "
                "WHERE ? IS NULL OR m.encoder = ? GROUP BY m.id "
                "ORDER BY max(v.last_used) DESC",
                (encoder, encoder),
            ).fetchall()
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        finally:
            conn.close()
        models = tuple(
            ModelEntries(e, d, int(n), int(b), None if t is None else t / 1e9)
            for e, d, n, b, t in rows
            if n
        )
        return CacheInfo(self.path, True, self.max_bytes, used, disk, models)

    def clear(self, encoder: str | None = None) -> int | None:
        """Remove every entry (the whole folder, readable or not), or one encoder's. Returns the
        entries removed (None when a whole unreadable cache went). UserError for an unknown
        encoder."""
        import shutil

        if encoder is None:
            try:
                n: int | None = sum(m.entries for m in self.info().models)
            except UserError:
                n = None
            if self.folder.exists():
                shutil.rmtree(self.folder)
            return n
        if not self.path.is_file():
            raise UserError(f"cache clear --encoder {encoder}: the embedding cache is empty")
        conn = self._open_for_command()
        try:
            self._known(conn, encoder, "clear")
            with _transaction(conn):
                cur = conn.execute(
                    "DELETE FROM vectors WHERE model IN (SELECT id FROM models WHERE encoder = ?)",
                    (encoder,),
                )
                conn.execute("DELETE FROM models WHERE encoder = ?", (encoder,))
            return int(cur.rowcount)
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        finally:
            conn.close()

    def _known(self, conn: sqlite3.Connection, encoder: str, action: str) -> None:
        """UserError unless the cache holds entries of `encoder`."""
        known = [r[0] for r in conn.execute("SELECT DISTINCT encoder FROM models")]
        if encoder not in known:
            raise UserError(
                f"cache {action} --encoder {encoder}: no such encoder in the embedding cache."
                f"{did_you_mean(encoder, known)} Cached: {', '.join(sorted(known)) or 'none'}"
            )

    def _open_for_command(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        return conn

    def _unreadable(self, e: sqlite3.Error) -> UserError:
        return UserError(
            f"embedding cache {self.path}: cannot read it ({e}); run `t2i-eval cache clear` to "
            "start it afresh (it only holds what can be recomputed)"
        )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): take the write lock up front, so that a
    busy database waits at BEGIN (busy timeout) instead of failing halfway."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch the file to WAL (a lasting property of the file; a no-op once set).

    The switch needs the file to itself, and SQLite answers "locked" at once, without its busy
    handler, when another process opens the fresh file at the same moment (two ranks starting
    together): so retry here, within the same busy timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            busy = getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _account(conn: sqlite3.Connection) -> tuple[int, int]:
    """(bytes, rows) of the size account kept by the triggers."""
    got = dict(conn.execute("SELECT name, value FROM account").fetchall())
    return int(got.get("bytes", 0)), int(got.get("rows", 0))


def cache_name(model_id: str, backend: str) -> str:
    """The name an encoder's vectors are stored under: `model_id` for the torch backend (as
    before backends existed, so existing entries stay valid), `model_id+backend` otherwise
    (`minilm+onnx-int8`): what `cache info` lists and `cache clear --encoder` takes."""
    return model_id if backend == "torch" else f"{model_id}+{backend}"


def model_backend(model: Any) -> str:
    """Which backend computes `model`'s vectors: its `backend` attribute (sentence-transformers
    models and `fast_encoder.OnnxSentenceEncoder` have one), else `torch`."""
    backend = getattr(model, "backend", None)
    return backend if isinstance(backend, str) and backend else "torch"


#: encode() keyword arguments that do not change the vectors; any other one bypasses the cache.
_NEUTRAL = frozenset({"show_progress_bar", "convert_to_numpy"})


class ModelProxy:
    """Any attribute it does not have itself is its wrapped `model`'s, so a wrapper around a
    SentenceTransformer is a drop-in for it (a missing `model`, as while unpickling, is an
    AttributeError, never a recursion)."""

    def __getattr__(self, name: str) -> Any:
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)


class CachedEncoder(ModelProxy):
    """A sentence encoder whose `.encode` serves cached vectors and computes only the misses.

    Drop-in for a SentenceTransformer: any other attribute is the wrapped model's. A cached
    vector is exactly (bit for bit) the one the model returned for that text when it was first
    computed. Models are batch-invariant only up to float rounding (padding changes the kernels'
    summation order, ~1e-7), so a list encoded all at once and a list half served from the cache
    can differ at that level; a list of all misses (no repeats) goes through the model as is.
    The device is not in the key: ranks on different GPUs (or CPU) share entries, as their
    vectors differ by rounding only. The backend is (`cache_name`): an int8 export's vectors
    differ by far more than rounding.
    """

    def __init__(
        self,
        model: Any,
        model_id: str,
        digest: str,
        cache: EmbeddingCache,
        backend: str = "torch",
    ) -> None:
        self.model = model
        self.model_id = model_id
        self.digest = digest
        self.cache = cache
        self.backend = backend
        self.name = cache_name(model_id, backend)

    def __repr__(self) -> str:
        return f"CachedEncoder({self.name!r}, {self.model!r})"

    def encode(
        self,
        texts: str | Sequence[str],
        normalize_embeddings: bool = False,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> Any:
        """Like the model's encode: a (len(texts), dim) array in input order (1-D for one str).

        Keyword arguments beyond normalize_embeddings, batch_size, show_progress_bar and
        convert_to_numpy=True (e.g. precision, convert_to_tensor, prompt) change what comes back,
        so they go straight to the model, uncached."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        plain = (
            set(kwargs) <= _NEUTRAL
            and kwargs.get("convert_to_numpy", True) is True
            and all(isinstance(t, str) for t in items)
        )
        if not (plain and items and self.cache.enabled):
            return self.model.encode(
                texts, normalize_embeddings=normalize_embeddings, batch_size=batch_size, **kwargs
            )
        import numpy as np

        keys = [entry_key(self.name, self.digest, normalize_embeddings, t) for t in items]
        found = self.cache.get(keys)
        todo = list(dict.fromkeys(t for t, k in zip(items, keys, strict=True) if k not in found))
        if todo:
            computed = np.asarray(
                self.model.encode(
                    todo, normalize_embeddings=normalize_embeddings, batch_size=batch_size, **kwargs
                )
            )
            new = {
                entry_key(self.name, self.digest, normalize_embeddings, t): v
                for t, v in zip(todo, computed, strict=True)
            }
            self.cache.put(self.name, self.digest, list(new.items()))
            found.update(new)
        out = np.stack([found[k] for k in keys])
        return out[0] if single else out


def cached_encoder(
    model: Any,
    model_id: str,
    *,
    digest: str | None = None,
    cache: EmbeddingCache | None = None,
    backend: str | None = None,
) -> CachedEncoder:
    """Wrap a loaded sentence encoder (anything with `.encode(texts, normalize_embeddings=...,
    batch_size=...)` returning a numpy array) so it goes through the embedding cache.

    `model_id` names it in `t2i-eval cache info` and `--encoder`; `digest` defaults to
    `weights_digest(model)` (computed here, once). `cache` defaults to the one under the cache
    folder with the bound from T2I_EVAL_EMBED_CACHE_MAX_MB. `backend` defaults to the
    model's own (`model_backend`) and goes into the entries' keys (`cache_name`).
    """
    if isinstance(model, CachedEncoder):  # wrapping twice would hash the wrapper's repr
        model = model.model
    cache = cache if cache is not None else EmbeddingCache()
    if digest is None:
        digest = weights_digest(model) if cache.max_bytes > 0 else "off"
    return CachedEncoder(model, model_id, digest, cache, backend or model_backend(model))
