"""Near-duplicate removal with the shipped MiniLM (all-MiniLM-L6-v2), as OVERT did with SemHash.

A candidate whose cosine similarity to one already kept is at or above the threshold is
dropped. Candidates are taken in order, so the first of a group of near-duplicates stays.
Vectors come through the shared embedding cache (`systems.text_guards.load_sentence_model`).
"""

from __future__ import annotations

from typing import Any

from ..systems.text_guards import MINILM, load_sentence_model


class Deduper:
    """The kept set of one group (a category's benign look-alikes, or its unsafe twins)."""

    def __init__(self, threshold: float, model: str = MINILM, batch_size: int = 64) -> None:
        self.threshold, self.model_ref, self.batch_size = float(threshold), model, int(batch_size)
        self.encoder = load_sentence_model(model)
        self.kept: Any = None  # (n, d) unit vectors of what was kept

    def encode(self, texts: list[str]) -> Any:
        """Unit vectors of `texts`, (n, d): encode a whole batch once, then `keep` it in parts."""
        import numpy as np

        return np.asarray(
            self.encoder.encode(list(texts), normalize_embeddings=True, batch_size=self.batch_size),
            dtype=np.float32,
        )

    def keep(self, texts: list[str], vecs: Any = None) -> list[bool]:
        """Whether each text is kept (True) or a near-duplicate of one kept before it (False);
        `vecs` are the texts' vectors when already encoded."""
        import numpy as np

        if not texts:
            return []
        if vecs is None:
            vecs = self.encode(texts)
        out = []
        for v in vecs:
            if self.kept is not None and float((self.kept @ v).max()) >= self.threshold:
                out.append(False)
                continue
            self.kept = v[None, :] if self.kept is None else np.vstack([self.kept, v])
            out.append(True)
        return out
