"""ct_jax.evaluation.evaluate_stream against the segment loop run stream by stream, document by document."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ct_jax
from ct_jax import evaluation
from ct_jax.autoregressive import IGNORE_INDEX, StreamBatch, losses
from ct_jax.memory import KNOCKOUTS
from tests.configs import CONFIGS

CONFIG = CONFIGS["heads1_subset_mem2x"]  # seq_len 4, mem 8, cmem 4: compression after 3 segments
# Every test runs 2 streams, 5 segments per call, and the reference pads to one shape: one compile of each.
STREAMS, PER_CALL = 2, 5
REFERENCE_ROWS, REFERENCE_WIDTH = 8, 48


@pytest.fixture(scope="module")
def model():
    model = ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(3))
    model.pos_emb[...] = 0.1 * jnp.ones_like(model.pos_emb[...])  # non-zero positions: their rows matter
    model.eval()
    return model


@nnx.jit
def _piece_losses(model, batch):
    return losses(model, batch)


def reference_bits(model, pieces: list[np.ndarray]) -> float:
    """Bits per predicted token of every piece run alone from empty memory: one row each (rows never
    interact), right-padded with uncounted targets to a common length, one compiled call."""
    pieces = [piece for piece in pieces if len(piece) >= 2]
    assert len(pieces) <= REFERENCE_ROWS and max(map(len, pieces)) <= REFERENCE_WIDTH + 1, "grow the reference"
    inputs = np.zeros((REFERENCE_ROWS, REFERENCE_WIDTH), np.int32)
    targets = np.full((REFERENCE_ROWS, REFERENCE_WIDTH), IGNORE_INDEX, np.int32)
    for row, piece in enumerate(pieces):
        inputs[row, : len(piece) - 1], targets[row, : len(piece) - 1] = piece[:-1], piece[1:]
    resets = np.zeros((REFERENCE_ROWS, REFERENCE_WIDTH // CONFIG["seq_len"]), bool)
    resets[:, 0] = True
    result = _piece_losses(model, StreamBatch(inputs, targets, None, resets))
    counted = int(np.sum(result.counts))
    assert counted == sum(len(piece) - 1 for piece in pieces), "every target of every piece must count once"
    return float(np.sum(result.nll)) / counted / math.log(2.0)


def test_one_document_equals_each_stream_alone(model):
    data = np.random.default_rng(0).integers(0, CONFIG["num_tokens"], 83).astype(np.uint8)
    length = len(data) // STREAMS
    expected = reference_bits(model, [data[i * length : (i + 1) * length] for i in range(STREAMS)])
    got = evaluation.evaluate_stream(model, data, STREAMS, segments_per_call=PER_CALL, progress=False)
    assert abs(got - expected) <= 1e-5, f"evaluate_stream {got} vs streams run alone {expected}"


def test_documents_reset_the_memory(model):
    data = np.random.default_rng(1).integers(0, CONFIG["num_tokens"], 90).astype(np.uint8)
    starts = np.array([0, 13, 14, 40, 41, 77])
    length = len(data) // STREAMS
    pieces = []
    for row in range(STREAMS):
        lo, hi = row * length, (row + 1) * length
        cuts = sorted({lo, hi, *[int(s) for s in starts if lo < s < hi]})
        pieces += [data[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    expected = reference_bits(model, pieces)
    got = evaluation.evaluate_stream(model, data, STREAMS, document_starts=starts, segments_per_call=PER_CALL,
                                     progress=False)
    assert abs(got - expected) <= 1e-5, f"evaluate_stream {got} vs documents run alone {expected}"


def test_one_compile_for_the_whole_split(model):
    data = np.random.default_rng(2).integers(0, CONFIG["num_tokens"], 200).astype(np.uint8)
    before = evaluation._chunk_nll._cache_size()
    evaluation.evaluate_stream(model, data, STREAMS, segments_per_call=PER_CALL, progress=False)  # 25 segments: 5 calls
    compiled = evaluation._chunk_nll._cache_size()
    assert compiled - before <= 1, "evaluation recompiled within a split"  # 0: an earlier test compiled it
    evaluation.evaluate_stream(model, data, STREAMS, segments_per_call=PER_CALL, max_segments=12,
                               progress=False)  # 3 calls, the last padded
    assert evaluation._chunk_nll._cache_size() == compiled, "evaluation recompiled across splits"


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
        evaluation.evaluate_stream(model, data, STREAMS, segments_per_call=PER_CALL, progress=False)
        assert not any(flags()), f"evaluate_stream left the model in eval mode: deterministic flags {flags()}"
    finally:
        model.eval()
    evaluation.evaluate_stream(model, data, STREAMS, segments_per_call=PER_CALL, progress=False)
    assert all(flags()), "a model in eval mode must stay in eval mode"


def test_stream_nll_sums_what_evaluate_stream_averages_on_token_arrays(model):
    ids = np.random.default_rng(4).integers(0, CONFIG["num_tokens"], 83)
    expected = evaluation.evaluate_stream(model, ids.astype(np.uint8), STREAMS, segments_per_call=PER_CALL,
                                          progress=False)
    nll, count = evaluation.stream_nll(model, ids.astype(np.uint16), STREAMS, segments_per_call=PER_CALL,
                                       progress=False)
    assert count == 2 * (83 // STREAMS - 1), "every target of each stream but its first token"
    assert nll / count / math.log(2.0) == expected, "uint16 token ids evaluate as the uint8 ones"


def test_knockout_of_an_empty_compressed_memory_changes_nothing(model):
    data = np.random.default_rng(5).integers(0, CONFIG["num_tokens"], 83).astype(np.uint8)
    # two segments per stream: the memory (8 slots) holds them, nothing is compressed yet
    plain = evaluation.stream_eval(model, data, STREAMS, segments_per_call=PER_CALL, max_segments=2, progress=False)
    knocked = evaluation.stream_eval(model, data, STREAMS, segments_per_call=PER_CALL, max_segments=2, progress=False,
                                     knockout="compressed")
    assert knocked.total == plain.total, f"empty compressed memory knocked out: {knocked.total} vs {plain.total}"
    whole = evaluation.stream_eval(model, data, STREAMS, segments_per_call=PER_CALL, progress=False)
    without = evaluation.stream_eval(model, data, STREAMS, segments_per_call=PER_CALL, progress=False,
                                     knockout="compressed")
    assert abs(without.total - whole.total) > 1e-4, "emptying a filled compressed memory must change the loss"
    assert without.count == whole.count


def test_knockout_equals_the_memory_emptied_by_hand_row_by_row(model):
    """losses(knockout=...) equals running segment by segment with the memory emptied by hand, rows reset apart."""
    rng = np.random.default_rng(6)
    seq_len, n = CONFIG["seq_len"], 7
    inputs = rng.integers(0, CONFIG["num_tokens"], (2, n * seq_len)).astype(np.int32)
    targets = rng.integers(0, CONFIG["num_tokens"], (2, n * seq_len)).astype(np.int32)
    resets = np.zeros((2, n), bool)
    resets[:, 0] = resets[1, 4] = True  # row 1 starts a document at segment 4, row 0 goes on
    batch = StreamBatch(inputs, targets, None, resets)
    compiled = {knockout: nnx.jit(functools.partial(losses, knockout=knockout)) for knockout in (None, *KNOCKOUTS)}
    for knockout in ("compressed", "memory"):
        got = compiled[knockout](model, batch)
        memories = ct_jax.Memory.empty(model, 2)
        for s in range(n):
            memories = memories.reset(jnp.asarray(resets[:, s])).knocked_out(knockout)
            window = slice(s * seq_len, (s + 1) * seq_len)
            segment = StreamBatch(inputs[:, window], targets[:, window], None, np.zeros((2, 1), bool))
            one = compiled[None](model, segment, memories)
            memories = one.memories
            assert float(abs(one.nll[0] - got.nll[s])) <= 1e-5, f"knockout={knockout}, segment {s}"
    emptied = compiled[None](model, StreamBatch(inputs, targets, None, np.ones((2, n), bool)))
    np.testing.assert_array_equal(compiled["memory"](model, batch).nll, emptied.nll,
                                  "knockout='memory' must equal a reset before every segment")


def test_buckets_partition_the_tokens_by_distance_from_the_document_start(model):
    data = np.random.default_rng(7).integers(0, CONFIG["num_tokens"], 200).astype(np.uint8)
    starts = np.array([0, 30, 47, 130])
    result = evaluation.stream_eval(model, data, STREAMS, document_starts=starts, segments_per_call=PER_CALL,
                                    progress=False)
    assert result.bucket_edges == (4, 12, 20), "default edges: window, + memory, + cmem_len * cmem_ratio"
    assert sum(result.bucket_count) == result.count, f"bucket counts {result.bucket_count} vs {result.count}"
    assert abs(sum(result.bucket_total) - result.total) <= 1e-4 * result.total
    # the targets by hand: documents cut at the stream boundary (100) and at each start
    expected = [0, 0, 0, 0]
    for begin, end in [(0, 30), (30, 47), (47, 100), (100, 130), (130, 200)]:
        for distance in range(end - begin - 1):
            expected[int(np.searchsorted(result.bucket_edges, distance, side="right"))] += 1
    assert list(result.bucket_count) == expected, f"bucket counts {result.bucket_count}, by hand {expected}"
    custom = evaluation.stream_eval(model, data, STREAMS, document_starts=starts, segments_per_call=PER_CALL,
                                    progress=False, bucket_edges=[8])
    assert custom.total == result.total and len(custom.bucket_count) == 2
    with pytest.raises(ValueError, match="bucket_edges must be non-decreasing positive ints, got \\[8, 4\\]"):
        evaluation.stream_eval(model, data, STREAMS, bucket_edges=[8, 4])
    with pytest.raises(ValueError, match="knockout must be one of 'compressed', 'memory', got 'cmem'"):
        evaluation.evaluate_stream(model, data, STREAMS, knockout="cmem")


def test_document_positions_count_from_each_rows_reset():
    resets = np.array([[True, False, False], [True, True, False]])
    np.testing.assert_array_equal(evaluation.document_positions(resets, 2), [[0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3]])


def test_attention_mass_sums_to_one_per_layer_and_leaves_the_loss_alone(model):
    data = np.random.default_rng(8).integers(0, CONFIG["num_tokens"], 120).astype(np.uint8)
    result = evaluation.stream_eval(model, data, STREAMS, segments_per_call=PER_CALL, progress=False,
                                    attention_mass=True)
    plain = evaluation.stream_eval(model, data, STREAMS, segments_per_call=PER_CALL, progress=False)
    mass = result.attention_mass
    assert mass.shape == (CONFIG["depth"], 3)
    np.testing.assert_allclose(mass.sum(axis=1), 1.0, atol=1e-5, err_msg=f"mass per layer {mass}")
    assert mass[0, 0] == mass[0, 1] == 0.0, f"layer 1 has no memory (memory_layers [2, 3]), got {mass[0]}"
    assert np.all(mass[1:, :2] > 0), f"memory layers attend to cmem and mem, got {mass[1:]}"
    assert abs(result.total - plain.total) <= 1e-5 * plain.total, "measuring the mass must not change the loss"
    emptied = evaluation.stream_eval(model, data, STREAMS, segments_per_call=PER_CALL, progress=False,
                                     attention_mass=True, knockout="compressed")
    assert np.all(emptied.attention_mass[:, 0] == 0), "no mass on an emptied compressed memory"
