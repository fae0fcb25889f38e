"""The ONNX encoder's runs of similar token counts: no padding beyond each run's longest text,
every text run exactly once, and the same vectors as torch in input order."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_fast_encoder import FP32_ATOL, WORDS, save_tiny_sentence_model  # noqa: E402

from t2i_eval.systems.fast_encoder import ROWS_PER_RUN, _features, runs  # noqa: E402
from t2i_eval.systems.text_guards import (  # noqa: E402
    _load_sentence_transformer,
    load_sentence_model,
)

#: More texts than one run holds, of token counts 1..n in shuffled order, so runs must regroup.
_RNG = np.random.default_rng(0)
TEXTS = [
    " ".join(WORDS[4:][: 1 + k % 6] * (1 + k // 6)) for k in _RNG.permutation(3 * ROWS_PER_RUN)
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_sentence_model(tmp_path_factory.mktemp("st") / "tiny"))


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_run_holds_what_tokenizing_its_texts_alone_gives(tiny, side):
    st = _load_sentence_transformer(tiny, "cpu")
    st.tokenizer.padding_side = side
    try:
        whole = {k: v.numpy() for k, v in _features(st, TEXTS).items()}
        seen = []
        for pos, inputs in runs(whole, ROWS_PER_RUN):
            alone = _features(st, [TEXTS[i] for i in pos])
            assert inputs.keys() == alone.keys()
            for k, v in alone.items():
                np.testing.assert_array_equal(inputs[k], v.numpy())
            seen.append(pos)
    finally:
        st.tokenizer.padding_side = "right"
    lengths = whole["attention_mask"].sum(axis=1)
    order = np.concatenate(seen)
    assert sorted(order) == list(range(len(TEXTS)))  # every text once
    assert list(lengths[order]) == sorted(lengths, reverse=True)  # similar counts together
    assert max(len(p) for p in seen) == ROWS_PER_RUN


def test_runs_without_a_mask_keep_every_column():
    ids = np.arange(12).reshape(3, 4)
    got = list(runs({"input_ids": ids}, 2))
    assert [list(p) for p, _ in got] == [[0, 1], [2]]
    np.testing.assert_array_equal(got[0][1]["input_ids"], ids[:2])
    assert list(runs({}, 2)) == []


def test_onnx_runs_short_unpadded_batches_and_matches_torch(tiny):
    torch_enc = load_sentence_model(tiny)
    onnx_enc = load_sentence_model(tiny, backend="onnx")
    session = onnx_enc.model.session
    calls: list[dict] = []

    class Spy:
        def run(self, names, inputs):
            calls.append(inputs)
            return session.run(names, inputs)

    onnx_enc.model.session = Spy()
    try:
        got = onnx_enc.encode(TEXTS, normalize_embeddings=True, batch_size=64)
    finally:
        onnx_enc.model.session = session
    want = torch_enc.encode(TEXTS, normalize_embeddings=True, batch_size=64)
    np.testing.assert_allclose(got, want, atol=FP32_ATOL)
    assert len(calls) == len(TEXTS) // ROWS_PER_RUN
    for inputs in calls:
        mask = inputs["attention_mask"]
        assert len(mask) <= ROWS_PER_RUN
        assert mask.shape[1] == mask.sum(axis=1).max()  # no column is padding for every text
