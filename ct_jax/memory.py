"""Fixed-shape memory: buffers of `mem_len` and `cmem_len` slots plus valid counts.

The reference's memory grows from empty; JAX needs static shapes. Valid slots are kept
right-aligned (newest last) and the compressed memory is non-empty only once the memory
is full, so the invalid slots of `cmem|mem` always sit at the far left and every valid
key keeps the distance it has in the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ct_jax.config import ModelConfig


class Memory(NamedTuple):
    """Per-memory-layer buffers; `mem_valid`/`compressed_mem_valid` count the valid slots.

    All memory layers always hold the same number of valid slots, so the counts are
    scalars (int32), shared by the layers and the batch. `mem_usage` exists only under
    compression="most_used": per memory slot, the attention it has received, summed over
    the full segments that read it (each averaged over heads and real queries); aligned
    with `mem`, zero on invalid slots. None otherwise (the pytree keeps a fixed structure
    per config).
    """

    mem: Float[Array, "l b m d"]
    compressed_mem: Float[Array, "l b c d"]
    mem_valid: Int[Array, ""]
    compressed_mem_valid: Int[Array, ""]
    mem_usage: Float[Array, "l b m"] | None = None

    @classmethod
    def empty(cls, model_or_config, batch: int, dtype=jnp.float32) -> Memory:
        """Empty memory for a model (or its `ModelConfig`) and a batch size."""
        config = getattr(model_or_config, "config", model_or_config)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"expected a CompressiveTransformer or ModelConfig, got {type(model_or_config).__name__}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        layers = len(config.memory_layers)
        zeros = jnp.zeros((layers, batch, config.mem_len, config.dim), dtype)
        czeros = jnp.zeros((layers, batch, config.cmem_len, config.dim), dtype)
        usage = jnp.zeros((layers, batch, config.mem_len), jnp.float32) if config.compression == "most_used" else None
        return cls(zeros, czeros, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), usage)

    @property
    def total_valid(self) -> Int[Array, ""]:
        """Valid slots of one memory layer's `cmem|mem`: the count that sets the position rows."""
        return self.mem_valid + self.compressed_mem_valid

    def layer(self, slot: int) -> LayerMemory:
        """The buffers and counts of memory layer `slot` (its index among the memory layers)."""
        usage = None if self.mem_usage is None else self.mem_usage[slot]
        return LayerMemory(self.mem[slot], self.compressed_mem[slot], self.mem_valid, self.compressed_mem_valid, usage)

    def slot_valid(self) -> Bool[Array, " k"]:
        """Which slots of a memory layer's `cmem|mem` hold entries (k = cmem_len + mem_len)."""
        return buffer_valid(self.compressed_mem.shape[2], self.compressed_mem_valid, self.mem.shape[2], self.mem_valid)


class LayerMemory(NamedTuple):
    """One memory layer's part of `Memory`: what its attention reads and returns updated."""

    mem: Float[Array, "b m d"]
    compressed_mem: Float[Array, "b c d"]
    mem_valid: Int[Array, ""]
    compressed_mem_valid: Int[Array, ""]
    mem_usage: Float[Array, "b m"] | None = None  # compression="most_used" only (see Memory)

    def slot_valid(self) -> Bool[Array, " k"]:
        """Which slots of `cmem|mem` hold entries (k = c + m)."""
        return buffer_valid(self.compressed_mem.shape[1], self.compressed_mem_valid, self.mem.shape[1], self.mem_valid)


def valid_slots(length: int, valid: Int[Array, ""]) -> Bool[Array, " n"]:
    """Boolean (length,) mask of the right-aligned valid slots of a buffer."""
    return jnp.arange(length) >= length - valid


def buffer_valid(n_cmem: int, cmem_valid: Int[Array, ""], n_mem: int, mem_valid: Int[Array, ""]) -> Bool[Array, " k"]:
    """The valid slots of `cmem|mem` (k = n_cmem + n_mem): the one mask of memory keys that
    attention, the segment forward's and the cached decoder's, applies."""
    return jnp.concatenate([valid_slots(n_cmem, cmem_valid), valid_slots(n_mem, mem_valid)])


def right_aligned_concat(
    first: Float[Array, "b n d"], first_valid, second: Float[Array, "b k d"], second_valid, out_len: int
) -> Float[Array, "b o d"]:
    """The last `out_len` entries of (valid part of `first`) ++ (valid part of `second`).

    Both inputs hold their valid entries right-aligned; the result does too, with its
    invalid slots zeroed.
    """
    n, k = first.shape[1], second.shape[1]
    total = first_valid + second_valid
    position = total - out_len + jnp.arange(out_len)  # index into the valid sequence
    from_first = position < first_valid
    index = jnp.where(from_first, n - first_valid + position, n + k - second_valid + position - first_valid)
    both = jnp.concatenate([first, second], axis=1)
    gathered = jnp.take(both, jnp.clip(index, 0, n + k - 1), axis=1)
    return jnp.where((position >= 0)[None, :, None], gathered, 0).astype(first.dtype)


def eviction_padding(evicted_count, ratio: int, mode: str = "upstream"):
    """Zeros put left of `evicted_count` evicted slots: upstream's `e % ratio` or the exact `-e % ratio`."""
    return evicted_count % ratio if mode == "upstream" else -evicted_count % ratio


def max_compressed_per_segment(seq_len: int, ratio: int, padding: str = "upstream") -> int:
    """Most slots one segment can add to the compressed memory under a padding rule."""
    return max((e + eviction_padding(e, ratio, padding)) // ratio for e in range(seq_len + 1))


def evicted_windows(
    mem: Float[Array, "b m d"], mem_valid, x: Float[Array, "b t d"], mem_len: int, ratio: int,
    padding: str = "upstream",
) -> tuple[Float[Array, "b n r d"], Int[Array, ""], Int[Array, ""]]:
    """Groups of `ratio` evicted slots, right-aligned, as upstream's Conv1d would see them.

    Upstream evicts `e = mem_valid + t - mem_len` slots, left-pads them with `e % ratio`
    zeros (its amount, kept for parity; `padding="exact"`: `-e % ratio`) and convolves
    with kernel = stride = ratio, dropping the incomplete tail. Returns (windows,
    number of evicted slots, number of valid windows); invalid windows are zero.
    """
    t = x.shape[1]
    n_out = max_compressed_per_segment(t, ratio, padding)
    evicted_count = jnp.maximum(mem_valid + t - mem_len, 0)
    padded_len = evicted_count + eviction_padding(evicted_count, ratio, padding)
    n_windows = padded_len // ratio
    # mem|x holds the valid sequence right-aligned; its first t slots are the evicted region.
    evicted = jnp.concatenate([mem, x], axis=1)[:, :t]
    evicted = jnp.where(valid_slots(t, evicted_count)[None, :, None], evicted, 0)
    span = n_out * ratio
    padded = jnp.pad(evicted, ((0, 0), (span, 0), (0, 0)))
    used_end = t - padded_len % ratio  # windows end where the dropped tail begins
    # padded[i] = evicted[i - span], so this is evicted[used_end - span : used_end]: the
    # n_out windows ending where the dropped tail begins, zeros left of the evicted region.
    window = jax.lax.dynamic_slice_in_dim(padded, used_end, span, axis=1)
    windows = window.reshape(window.shape[0], n_out, ratio, window.shape[-1])
    windows = jnp.where(valid_slots(n_out, n_windows)[None, :, None, None], windows, 0)
    return windows, evicted_count, n_windows
