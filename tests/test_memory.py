"""Per-row memory: a batch whose rows hold different amounts of memory computes, row by row,
what each row computes alone; `Memory.reset` empties rows; torch conversion refuses unequal rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ct_jax
from ct_jax import convert
from tests.configs import CONFIGS, forward, present_fields

# (config, segments each row has already seen): empty, filling, full with compressed memory.
CASES = {
    "heads1_subset_mem2x": (0, 1, 4),
    "residual_uneven_evictions": (3, 0, 1),
    "mogrify_odd_seq": (2, 5, 0),
    "small_emb_no_recurrence": (1, 3, 0),
}
ATOL = 1e-5  # float32; rows differ from their solo runs only by summation order


def rows_of(memory: ct_jax.Memory, rows: slice) -> ct_jax.Memory:
    return ct_jax.Memory(memory.mem[:, rows], memory.compressed_mem[:, rows], memory.mem_valid[rows],
                         memory.compressed_mem_valid[rows],
                         None if memory.mem_usage is None else memory.mem_usage[:, rows])


def stack_rows(memories: list[ct_jax.Memory]) -> ct_jax.Memory:
    return ct_jax.Memory(*(jnp.concatenate(parts, axis=axis) for parts, axis in
                           zip(zip(*memories), (1, 1, 0, 0))))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rows_with_different_memory_compute_what_each_row_computes_alone(name):
    config = CONFIGS[name]
    model = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(1))
    model.train()  # the aux loss is computed per row too
    seq_len, vocab = config["seq_len"], config["num_tokens"]
    solo = []
    for row, seen in enumerate(CASES[name]):
        memory = ct_jax.Memory.empty(model, 1)
        for segment in range(seen):
            tokens = jax.random.randint(jax.random.key(10 * row + segment), (1, seq_len), 0, vocab)
            _, memory, _ = forward(model, tokens, memory, None)
        solo.append(memory)
    batch_memory = stack_rows(solo)
    counts = np.asarray(batch_memory.total_valid)
    assert len(set(counts.tolist())) == 3, f"rows should hold different amounts of memory, got {counts}"

    full_segment_aux = None
    for t in (seq_len, seq_len - 1):  # a full segment (memory update, aux loss) and a short one
        tokens = jax.random.randint(jax.random.key(99 + t), (3, t), 0, vocab)
        mask = jnp.ones((3, t), bool).at[1, -1].set(False)
        logits, memory, aux = forward(model, tokens, batch_memory, mask)
        row_aux = []
        for row in range(3):
            one = slice(row, row + 1)
            alone_logits, alone_memory, alone_aux = forward(model, tokens[one], solo[row], mask[one])
            row_aux.append(float(alone_aux))
            diff = float(jnp.max(jnp.abs(logits[row] - alone_logits[0])))
            assert diff <= ATOL, f"{name}, t={t}: row {row} logits differ from the row alone by {diff:.2e}"
            for field, got, expected in present_fields(rows_of(memory, slice(row, row + 1)), alone_memory):
                diff = float(jnp.max(jnp.abs(jnp.asarray(got, jnp.float32) - jnp.asarray(expected, jnp.float32))))
                assert diff <= ATOL, f"{name}, t={t}: row {row} memory.{field} differs from the row alone by {diff:.2e}"
        assert abs(float(aux) - np.mean(row_aux)) <= ATOL, (
            f"{name}, t={t}: batch aux loss {float(aux)} is not the mean of the rows' {row_aux}")
        full_segment_aux = full_segment_aux or row_aux
    assert sum(a > 0 for a in full_segment_aux) >= 1, f"{name}: the aux path must be exercised, got {full_segment_aux}"


def test_reset_empties_only_the_given_rows():
    model = ct_jax.CompressiveTransformer(**CONFIGS["heads1_subset_mem2x"], rngs=nnx.Rngs(0))
    memory = ct_jax.Memory.empty(model, 3)
    memory = memory._replace(mem=memory.mem + 1.0, compressed_mem=memory.compressed_mem + 2.0,
                             mem_valid=jnp.array([8, 8, 4]), compressed_mem_valid=jnp.array([4, 2, 0]))
    reset = memory.reset(jnp.array([False, True, False]))
    np.testing.assert_array_equal(reset.mem_valid, [8, 0, 4])
    np.testing.assert_array_equal(reset.compressed_mem_valid, [4, 0, 0])
    assert not np.asarray(reset.mem[:, 1]).any(), "row 1 of mem not zeroed"
    assert not np.asarray(reset.compressed_mem[:, 1]).any(), "row 1 of compressed_mem not zeroed"
    np.testing.assert_array_equal(reset.mem[:, [0, 2]], memory.mem[:, [0, 2]])
    with pytest.raises(ValueError, match=r"rows must be a bool array of shape \(3,\)"):
        memory.reset(jnp.array([True, False]))


def test_memory_to_torch_refuses_rows_of_different_lengths():
    model = ct_jax.CompressiveTransformer(**CONFIGS["heads1_subset_mem2x"], rngs=nnx.Rngs(0))
    memory = ct_jax.Memory.empty(model, 2)._replace(mem_valid=jnp.array([4, 8]))
    with pytest.raises(ValueError, match=r"memories.mem_valid differs between rows \(\[4, 8\]\)"):
        convert.memory_to_torch(memory)
    equal = ct_jax.Memory.empty(model, 2)._replace(mem_valid=jnp.array([4, 4]))
    assert tuple(convert.memory_to_torch(equal).mem.shape) == (2, 2, 4, 16)
