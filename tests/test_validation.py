"""ct_jax.validation: eager checks of a forward call's memory counts (scalar or per row)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import ct_jax
from ct_jax.validation import check_valid_counts

CONFIG = dict(num_tokens=16, dim=8, seq_len=4, depth=1, heads=2, mem_len=4, cmem_len=2, cmem_ratio=2)


def _per_row(count) -> jax.Array:
    """One count for each of the 2 rows (a scalar count: the same in every row)."""
    return jnp.broadcast_to(jnp.asarray(count, jnp.int32), (2,))


def _memory(model, mem_valid, cmem_valid) -> ct_jax.Memory:
    empty = ct_jax.Memory.empty(model, 2)
    return empty._replace(mem_valid=_per_row(mem_valid), compressed_mem_valid=_per_row(cmem_valid))


@pytest.fixture(scope="module")
def model():
    return ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mem_valid, cmem_valid, message", [
    (999, 0, r"memories.mem_valid must lie in \[0, 4\] \(its buffer's slots\), got \[999, 999\]"),
    (4, -5, r"memories.compressed_mem_valid must lie in \[0, 2\] \(its buffer's slots\), got \[-5, -5\]"),
    (2, 1, "non-zero .* while the memory is not full"),
])
def test_an_eager_call_refuses_impossible_memory_counts(model, mem_valid, cmem_valid, message):
    with pytest.raises(ValueError, match=message):
        model(jnp.zeros((2, 4), jnp.int32), _memory(model, mem_valid, cmem_valid))


def test_an_eager_call_accepts_full_memory_and_compressed_memory(model):
    """Once, not beside each refusal: an eager forward compiles each of its ops (under jit the
    counts are traced and not checked)."""
    logits, _, _ = model(jnp.zeros((2, 4), jnp.int32), _memory(model, 4, 2))
    assert logits.shape == (2, 4, CONFIG["num_tokens"])


def test_per_row_counts_are_checked_too(model):
    config = model.config
    check_valid_counts(_memory(model, [4, 0], [2, 0]), config)
    with pytest.raises(ValueError, match=r"mem_valid must lie in \[0, 4\] .*got \[4, 5\]"):
        check_valid_counts(_memory(model, [4, 5], [0, 0]), config)
    with pytest.raises(ValueError, match="while the memory is not full"):
        check_valid_counts(_memory(model, [4, 3], [1, 1]), config)


def test_traced_counts_are_not_checked_on_the_hot_path(model):
    checked = jax.jit(lambda memory: (check_valid_counts(memory, model.config), memory.mem_valid)[1])
    assert checked(_memory(model, 999, 0)).tolist() == [999, 999]
