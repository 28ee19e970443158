"""ct_jax.evaluation.evaluate_stream against the segment loop run stream by stream, document by document."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ct_jax
from ct_jax import evaluation
from ct_jax.autoregressive import segment_losses
from tests.configs import CONFIGS

CONFIG = CONFIGS["heads1_subset_mem2x"]  # seq_len 4, mem 8, cmem 4: compression after 3 segments


@pytest.fixture(scope="module")
def model():
    model = ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(3))
    model.pos_emb[...] = 0.1 * jnp.ones_like(model.pos_emb[...])  # non-zero positions: their rows matter
    model.eval()
    return model


def reference_bits(model, pieces: list[np.ndarray]) -> float:
    """Bits per predicted token of every piece run alone from empty memory (segment_losses, one row)."""
    total, count = 0.0, 0
    for piece in pieces:
        if len(piece) < 2:
            continue
        lm, _, _ = segment_losses(model, jnp.asarray(piece[None], jnp.int32))
        counts = [min(CONFIG["seq_len"], len(piece) - 1 - i) for i in range(0, len(piece) - 1, CONFIG["seq_len"])]
        total += float(np.dot(np.asarray(lm), counts))
        count += sum(counts)
    return total / count / math.log(2.0)


def test_one_document_equals_each_stream_alone(model):
    data = np.random.default_rng(0).integers(0, CONFIG["num_tokens"], 83).astype(np.uint8)
    length = len(data) // 3
    expected = reference_bits(model, [data[i * length : (i + 1) * length] for i in range(3)])
    got = evaluation.evaluate_stream(model, data, 3, segments_per_call=4, progress=False)
    assert abs(got - expected) <= 1e-5, f"evaluate_stream {got} vs streams run alone {expected}"


def test_documents_reset_the_memory(model):
    data = np.random.default_rng(1).integers(0, CONFIG["num_tokens"], 90).astype(np.uint8)
    starts = np.array([0, 13, 14, 40, 41, 77])
    length = len(data) // 2
    pieces = []
    for row in range(2):
        lo, hi = row * length, (row + 1) * length
        cuts = sorted({lo, hi, *[int(s) for s in starts if lo < s < hi]})
        pieces += [data[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    expected = reference_bits(model, pieces)
    got = evaluation.evaluate_stream(model, data, 2, document_starts=starts, segments_per_call=3, progress=False)
    assert abs(got - expected) <= 1e-5, f"evaluate_stream {got} vs documents run alone {expected}"


def test_one_compile_for_the_whole_split(model):
    data = np.random.default_rng(2).integers(0, CONFIG["num_tokens"], 200).astype(np.uint8)
    before = evaluation._chunk_nll._cache_size()
    evaluation.evaluate_stream(model, data, 2, segments_per_call=5, progress=False)  # 25 segments: 5 calls
    evaluation.evaluate_stream(model, data, 2, segments_per_call=5, max_segments=12, progress=False)  # 3, padded
    assert evaluation._chunk_nll._cache_size() - before == 1, "evaluation recompiled within or across splits"


def test_bad_arguments(model):
    data = np.zeros(40, np.uint8)
    with pytest.raises(ValueError, match="segments_per_call must be a positive int, got 0"):
        evaluation.evaluate_stream(model, data, 2, segments_per_call=0)
    with pytest.raises(ValueError, match="too short for 30 streams"):
        evaluation.evaluate_stream(model, data, 30)


def test_the_callers_mode_is_restored(model):
    """evaluate_stream runs in eval mode and hands the model back in the mode it came in."""
    data = np.random.default_rng(2).integers(0, CONFIG["num_tokens"], 200).astype(np.uint8)

    def flags():
        return [module.deterministic for _, module in nnx.iter_graph(model) if hasattr(module, "deterministic")]

    model.train()
    try:
        assert not any(flags()), "the model should start in train mode"
        evaluation.evaluate_stream(model, data, 2, segments_per_call=5, progress=False)
        assert not any(flags()), f"evaluate_stream left the model in eval mode: deterministic flags {flags()}"
    finally:
        model.eval()
    evaluation.evaluate_stream(model, data, 2, segments_per_call=5, progress=False)
    assert all(flags()), "a model in eval mode must stay in eval mode"
