"""Training on streams: the memory carried across steps and micro-batches, resets per row, the train step."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import ct_jax
from ct_jax import streams, training
from ct_jax.autoregressive import grads
from tests.configs import CONFIGS, TRAIN_MODEL, present_fields

CONFIG = CONFIGS["heads1_subset_mem2x"]  # seq_len 4, mem 8, cmem 4: compression from the third segment
SEQ_LEN = CONFIG["seq_len"]


def stream_batch(n_segments: int, rows: int = 4, seed: int = 0) -> streams.StreamBatch:
    """Streams through random documents of 3..30 tokens."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 30, 40)
    split = rng.integers(0, CONFIG["num_tokens"], int(sizes.sum())).astype(np.uint8)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sampler = streams.StreamSampler(split, starts, SEQ_LEN, n_segments, rows, seed=seed)
    return next(sampler)


def segments_of(batch: streams.StreamBatch, lo: int, hi: int) -> streams.StreamBatch:
    cut = slice(lo * SEQ_LEN, hi * SEQ_LEN)
    return streams.StreamBatch(batch.inputs[:, cut], batch.targets[:, cut], batch.mask[:, cut], batch.resets[:, lo:hi])


@pytest.fixture(scope="module")
def model():
    model = ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(4))
    model.pos_emb[...] = 0.05 * jax.random.normal(jax.random.key(0), model.pos_emb[...].shape)
    return model


@pytest.fixture(scope="module")
def grads_fn():
    return nnx.jit(functools.partial(grads, batch_mean=True), static_argnames=("micro_batches",))


def test_memory_carried_across_steps_equals_one_long_step(model, grads_fn):
    batch = stream_batch(6)
    assert batch.resets[:, 1:].any(), "the batch should reset some row mid-way"
    empty = ct_jax.Memory.empty(model, 4)
    _, lm, aux, _, memory = grads_fn(model, batch, empty)
    _, lm_a, aux_a, _, carried = grads_fn(model, segments_of(batch, 0, 3), empty)
    _, lm_b, aux_b, _, final = grads_fn(model, segments_of(batch, 3, 6), carried)
    np.testing.assert_allclose(np.concatenate([lm_a, lm_b]), lm, atol=1e-6, err_msg="lm per segment")
    np.testing.assert_allclose(np.concatenate([aux_a, aux_b]), aux, atol=1e-6, err_msg="aux per segment")
    for field, got, expected in present_fields(final, memory):
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"memory.{field} after two steps")
    assert float(np.max(aux)) > 0, "the aux path must be exercised"


def test_micro_batches_split_the_carried_memory_by_row(model, grads_fn):
    batch = stream_batch(3, seed=1)
    _, _, _, _, start = grads_fn(model, stream_batch(3, seed=2), ct_jax.Memory.empty(model, 4))  # unequal rows
    split = grads_fn(model, batch, start, micro_batches=2)
    whole = grads_fn(model, batch, start)
    for field, got, expected in present_fields(split[4], whole[4]):
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"memory.{field} with 2 micro-batches")
    # every micro-batch divides by the whole batch's target count: the same loss and gradient
    for name, got, expected in zip(("objective", "lm", "aux"), split[:3], whole[:3]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=f"{name} with 2 micro-batches")
    for got, expected in zip(jax.tree.leaves(split[3]), jax.tree.leaves(whole[3])):
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg="gradient with 2 micro-batches")
    assert (np.asarray(batch.targets) == streams.IGNORE_INDEX).any(), "the batch should hold padding"


def test_train_step_carries_the_memory_in_the_state():
    config = training.TrainConfig(batch_size=4, n_segments=2, learning_rate=1e-2, data_order="streams")
    trainer = training.Trainer(training.create_model(TRAIN_MODEL, config), config,
                               compiler_options=training.FAST_CPU_COMPILE)
    state = trainer.place(trainer.init_state())
    assert state.memory is not None and state.memory.mem_valid.shape == (4,)
    split = np.random.default_rng(0).integers(0, 256, 390).astype(np.uint8)
    # documents of 13 bytes: 3 segments of 4 targets, so rows reset at either segment of a step
    sampler = streams.StreamSampler(split, np.arange(0, 390, 13), TRAIN_MODEL["seq_len"], 2, 4, seed=0)
    late_resets = 0
    for _ in range(3):
        batch = next(sampler)
        state, metrics = trainer.train_step(state, batch)
        assert np.isfinite(trainer.metrics(metrics)["loss"])
        # mem_len 4, cmem_len 2, ratio 2: one segment since the reset holds 4 slots, two or more 4 + 2
        expected = np.where(batch.resets[:, -1], 4, 6)
        memory = trainer.host(state).memory  # numpy on the host
        np.testing.assert_array_equal(memory.mem_valid + memory.compressed_mem_valid, expected,
                                      err_msg=f"memory per row after resets {batch.resets.tolist()}")
        late_resets += int(batch.resets[:, -1].sum())
    assert late_resets, "no row reset at a step's last segment: the test does not exercise carried resets"
