"""Sentence encoders run by ONNX Runtime: the backends `onnx` (fp32) and `onnx-int8` of
`text_guards.load_sentence_model`.

The loaded sentence-transformers model is exported once (the whole module stack: transformer,
pooling, Normalize when the model has it, so the vectors are the ones sentence-transformers
computes) into the cache folder, keyed by its weights digest; `onnx-int8` is that export with
its MatMul weights quantised to int8 per output channel (ONNX Runtime's dynamic quantisation:
activations are quantised on the fly). Tokenization stays with the model's own tokenizer
(`SentenceTransformer.preprocess`), so truncation and special tokens are unchanged.

Each batch runs in short runs of texts of similar token counts (`runs`, `ROWS_PER_RUN`), so
little of the time goes on padding.

Why not the default: measured on this project's CPU machine (docs/text_encoders.md, made by
bench/text_encoder_speed.py), fp32 ONNX is ~1.85x torch's speed on one thread (same decisions on
OVERT-mini) and int8 2.6-3.0x (over four runs), but int8 moves the concept guard's max_cos by up
to 0.065, which flips 26 of 1,799 OVERT-mini decisions; the default stays `torch` until a backend
is both >= 3x faster and decision-identical (the bar of the issue that added these backends). The
bench also measures why fp32 cannot get there on that CPU: the encoder's matrix products alone,
unpadded, at the best one-thread speed measured, come to ~2.6x torch. Other int8 recipes
(reduce_range, uint8 weights, per-tensor scales, MatMul only, other rows per run, 8-bit
block-wise weights) were measured on 2026-11-30: none was both as fast and with fewer flips.
ONNX Runtime's transformer fusions (onnxruntime.transformers.optimizer: Attention,
SkipLayerNormalization, BiasGelu, exact Gelu) were tried and measured 0.93-1.00x this graph's
speed, so the export stays unfused.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..embed_cache import ModelProxy
from ..errors import MissingExtra, UserError, did_you_mean
from ..paths import cache_root
from ..store import atomic_write_bytes

if TYPE_CHECKING:
    import numpy as np

#: What `backend:` accepts: the torch model itself, or its ONNX export in fp32 or int8.
BACKENDS = ("torch", "onnx", "onnx-int8")
#: Decided by measurement (module docstring): the faster path is the default only when the
#: concept guard's decisions on OVERT-mini stay identical with it.
DEFAULT_BACKEND = "torch"
#: Bump when the export recipe changes what the files hold: a new folder, nothing mixed.
EXPORT_VERSION = 1
OPSET = 17
#: The fp32 export must reproduce the torch vectors to this (max |difference|, relative to the
#: largest component) before it is kept: float32 summation-order noise is ~1e-7 here; a traced
#: graph that baked in a shape-dependent branch is off by far more.
EXPORT_TOLERANCE = 1e-4
#: Texts the export is traced with and then checked on: different lengths, so padding is
#: exercised (a traced graph must not have specialised on an all-ones attention mask).
_TRACE_TEXTS = ("a photo", "a man reading a newspaper on a long train journey through the hills")
_CHECK_TEXTS = (
    "a knife on a kitchen table",
    "two children flying a red kite over a windy beach at sunset, oil painting",
    "war",
)
_FILES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx"}
#: Texts per ONNX Runtime call. A batch is padded to its longest text, so on OVERT-mini's short
#: prompts (10-49 tokens) a whole batch of 64 spends ~39% of its tokens on padding; runs of 8
#: texts of similar token counts cut that to ~6% while a run is still big enough for efficient
#: matrix products: measured 1.9x torch's prompts/s vs 1.1x in runs of 64 (4: 1.85x, 16: 1.8x;
#: docs/text_encoders.md). Vectors move by float32 summation noise only.
ROWS_PER_RUN = 8


def vectors_digest(digest: str) -> str:
    """What the embedding cache keys an ONNX backend's vectors by: the weights `digest`, the
    export version and `ROWS_PER_RUN` (the batching recipe: vectors made by another recipe are
    not served as this one's). An int8 vector also depends on which texts shared its run (its
    activations are quantised per run, moving it by up to ~5e-4 on the tiny test model), which
    no key can name: a cached int8 vector is the one the first batch that held the text made."""
    return f"{digest}-v{EXPORT_VERSION}-r{ROWS_PER_RUN}"


def check_backend(backend: object, where: str) -> str:
    """`backend`, or a UserError naming the choices (e.g. for `concept:backend=onx`)."""
    if backend not in BACKENDS:
        raise UserError(
            f"{where}: unknown backend {backend!r}.{did_you_mean(str(backend), BACKENDS)} "
            f"Available: {', '.join(BACKENDS)}"
        )
    return str(backend)


def export_dir(digest: str) -> Path:
    """Where a model's exports live: `<cache root>/onnx/v<EXPORT_VERSION>-<digest>`."""
    return cache_root() / "onnx" / f"v{EXPORT_VERSION}-{digest}"


def ensure_export(model: Any, digest: str, backend: str) -> Path:
    """The ONNX file of `backend` for the sentence-transformers `model` whose weights digest is
    `digest`, exported (and for int8 quantised) on first use and reused afterwards.

    Each file is written aside and renamed into place (`store.atomic_write_bytes`), so processes
    exporting at the same moment each publish a complete file and a reader never sees a partial
    one; the last rename wins, and every candidate is valid. Models whose export exceeds
    protobuf's 2 GiB are not supported (external-data files do not rename atomically)."""
    fp32 = export_dir(digest) / _FILES["onnx"]
    if not fp32.is_file():
        data = export_onnx(model)
        check_export(model, data)
        atomic_write_bytes(fp32, data)
    if backend == "onnx":
        return fp32
    int8 = export_dir(digest) / _FILES[backend]
    if not int8.is_file():
        atomic_write_bytes(int8, quantize_int8(fp32))
    return int8


def _onnx_tools() -> None:
    try:
        import onnx  # noqa: F401  (torch's exporter and the quantiser both need it)
        import onnxruntime  # noqa: F401
    except ImportError:
        raise MissingExtra(
            "the onnx text-encoder backends", "onnx and onnxruntime", "guards"
        ) from None


def _features(model: Any, texts: Sequence[str]) -> dict[str, Any]:
    """The model's own tokenization of `texts` (tensors only: the ONNX graph's inputs)."""
    prep = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers < 6
    return {k: v for k, v in prep(list(texts)).items() if hasattr(v, "shape")}


def export_onnx(model: Any) -> bytes:
    """The serialized fp32 ONNX graph of the whole module stack (-> `sentence_embedding`),
    traced by torch's TorchScript exporter with batch and token axes left dynamic."""
    _onnx_tools()
    import torch

    probe = getattr(model, "preprocess", None) or model.tokenize
    sample = probe(list(_TRACE_TEXTS))
    names = [k for k, v in sample.items() if isinstance(v, torch.Tensor)]
    constants = {k: v for k, v in sample.items() if k not in names}  # e.g. modality: "text"

    class Stack(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: Any) -> Any:
            return self.inner({**dict(zip(names, inputs, strict=True)), **constants})[
                "sentence_embedding"
            ]

    axes = {k: {0: "batch", 1: "tokens"} for k in names}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation notes users cannot act on
        torch.onnx.export(
            Stack(model).eval(),
            tuple(sample[k] for k in names),
            buf,
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,  # the dynamo exporter needs onnxscript; this one traces
        )
    return buf.getvalue()


def check_export(model: Any, data: bytes) -> None:
    """UserError unless the export reproduces the torch vectors (EXPORT_TOLERANCE) on texts
    other than those it was traced with, padded and unpadded."""
    import numpy as np

    session = _session(data)
    for texts in (list(_CHECK_TEXTS), [_CHECK_TEXTS[0]]):
        want = np.asarray(model.encode(texts, batch_size=len(texts)), dtype=np.float32)
        feats = _features(model, texts)
        got = session.run(None, {k: feats[k].numpy() for k in _input_names(session)})[0]
        scale = max(1.0, float(np.abs(want).max()))
        diff = float(np.abs(got - want).max()) / scale
        if not diff <= EXPORT_TOLERANCE:
            raise UserError(
                f"backend onnx: the exported graph of {type(model).__name__} differs from the "
                f"torch model by {diff:.1e} (allowed {EXPORT_TOLERANCE:.0e}); this model does not "
                "trace to ONNX faithfully: use backend torch"
            )


def quantize_int8(fp32: Path) -> bytes:
    """`fp32` with its MatMul weights quantised to int8 per output channel (dynamic
    quantisation: activations are quantised per batch at run time). Per channel because, when
    this was chosen, per tensor moved MiniLM's vectors ~5x more (1 - cos up to 0.066 vs 0.013 on
    384 OVERT-mini prompts) at the same speed."""
    _onnx_tools()
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_log(), tempfile.TemporaryDirectory(dir=fp32.parent, prefix=".q-") as tmp:
        out = Path(tmp) / "model-int8.onnx"
        quantize_dynamic(fp32, out, weight_type=QuantType.QInt8, per_channel=True)
        return out.read_bytes()


class _quiet_root_log:
    """Drop warnings logged on the root logger while quantising (onnxruntime's quantiser logs its
    advice to pre-process the graph there, and a root-logger call with no handler would install
    one for the whole process as a side effect)."""

    def __enter__(self) -> None:
        root = logging.getLogger()
        self.added = None if root.handlers else logging.NullHandler()
        if self.added:
            root.addHandler(self.added)
        self.filter = lambda record: record.levelno >= logging.ERROR
        root.addFilter(self.filter)

    def __exit__(self, *_: object) -> None:
        root = logging.getLogger()
        root.removeFilter(self.filter)
        if self.added:
            root.removeHandler(self.added)


def threads() -> int:
    """ONNX Runtime's intra-op threads: torch's count (OMP_NUM_THREADS, torch.set_num_threads),
    so that a comparison of the backends is per thread, and a 1-thread setting is kept."""
    import torch

    return max(1, int(torch.get_num_threads()))


def _session(model: bytes | Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def _input_names(session: Any) -> list[str]:
    return [i.name for i in session.get_inputs()]


def runs(
    features: dict[str, np.ndarray], size: int
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The tokenized batch `features` ((texts, tokens) arrays with an `attention_mask`) as runs
    of at most `size` texts, fewest tokens last, each cut to the token columns its own texts
    use: (row positions in the batch, inputs of that run).

    The cut keeps the span from the first to the last column some text of the run attends to,
    which drops padding on either side and nothing else, so a run holds exactly what tokenizing
    its texts alone gives; without an `attention_mask` the runs keep every column."""
    import numpy as np

    mask = features.get("attention_mask")
    n = len(next(iter(features.values()))) if features else 0
    lengths = mask.sum(axis=1) if mask is not None else np.zeros(n)
    order = np.argsort(-lengths, kind="stable")
    step = max(1, size)
    for start in range(0, n, step):
        pos = order[start : start + step]
        used = np.flatnonzero(mask[pos].any(axis=0)) if mask is not None else np.zeros(0, int)
        keep = slice(used[0], used[-1] + 1) if used.size else slice(None)
        yield pos, {k: v[pos][:, keep] for k, v in features.items()}


class OnnxSentenceEncoder(ModelProxy):
    """A sentence-transformers model's ONNX export behind the same `.encode` (numpy out).

    Texts are tokenized in batches of `batch_size` formed as sentence-transformers forms them
    (longest texts first) and each batch runs in groups of similar token counts (`runs`), so
    little time goes on padding; vectors come back in input order. Any attribute other than
    `encode` is the torch model's (`tokenizer`, `get_sentence_embedding_dimension`,
    `state_dict`); `backend` says which export runs, so the embedding cache keeps its vectors
    apart, and `weights_digest` is the torch weights' digest the export was made from (a
    trained probe's card pins it: `probe.encoders`).
    """

    def __init__(self, model: Any, path: Path, backend: str, weights_digest: str) -> None:
        self.model = model
        self.path = path
        self.backend = backend
        self.weights_digest = weights_digest
        self.session = _session(path)
        self.inputs = _input_names(self.session)

    def __repr__(self) -> str:
        return f"OnnxSentenceEncoder({self.backend!r}, {self.model!r})"  # stable: no paths

    def encode(
        self,
        texts: str | Sequence[str],
        normalize_embeddings: bool = False,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        **kwargs: Any,
    ) -> np.ndarray:
        """float32 (len(texts), dim) in input order (1-D for one str); `normalize_embeddings`
        divides by the L2 norm as torch's `F.normalize` does (eps 1e-12).

        Other sentence-transformers options (precision, prompt, convert_to_tensor, ...) are not
        implemented here: a TypeError names them rather than silently ignoring them."""
        import numpy as np
        from tqdm import tqdm

        unsupported = sorted(kwargs) + ([] if convert_to_numpy else ["convert_to_numpy=False"])
        if unsupported:
            raise TypeError(
                f"{self!r}.encode: {', '.join(unsupported)} not supported by the ONNX backend; "
                "use backend torch for them"
            )
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        order = np.argsort([-len(t) for t in items], kind="stable")
        rows: list[np.ndarray] = []
        done: list[np.ndarray] = []
        starts = range(0, len(items), batch_size)
        for start in tqdm(starts, desc="Batches", disable=not show_progress_bar):
            chunk = order[start : start + batch_size]
            feats = _features(self.model, [items[i] for i in chunk])
            for pos, inputs in runs(
                {k: feats[k].numpy() for k in self.inputs}, min(batch_size, ROWS_PER_RUN)
            ):
                rows.append(self.session.run(None, inputs)[0])
                done.append(chunk[pos])
        dim = self.dimension()
        out = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        back = np.empty_like(out)
        back[np.concatenate(done) if done else order] = out
        return back[0] if single else back

    def dimension(self) -> int:
        """Length of one embedding (the torch model's own answer)."""
        get: Callable[[], int] = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension
        )
        return int(get())


def check_device(backend: str, device: str) -> None:
    """UserError for an ONNX backend on anything but the CPU (checked before any model loads)."""
    if backend != "torch" and device != "cpu":
        raise UserError(
            f"backend {backend} runs on the CPU only, not device {device!r}: use backend torch "
            "on a GPU (it is the fast path there)"
        )


def load_onnx_encoder(model: Any, digest: str, backend: str, device: str) -> OnnxSentenceEncoder:
    """The ONNX backend for a loaded sentence-transformers `model` (CPU only)."""
    check_device(backend, device)
    _onnx_tools()
    return OnnxSentenceEncoder(model, ensure_export(model, digest, backend), backend, digest)
