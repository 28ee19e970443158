"""Fixed-shape memory: buffers of `mem_len` and `cmem_len` slots plus valid counts per row.

The reference's memory grows from empty; JAX needs static shapes. Valid slots are kept
right-aligned (newest last) and the compressed memory is non-empty only once the memory
is full, so the invalid slots of `cmem|mem` always sit at the far left and every valid
key keeps the distance it has in the reference. Both hold per row: rows may hold different
amounts of memory (a streamed batch resets a row where its document ends), and each row
computes what it would alone.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ct_jax._checks import check_choice
from ct_jax.config import ModelConfig

KNOCKOUTS = ("compressed", "memory")  # what `Memory.knocked_out` empties


class Memory(NamedTuple):
    """Per-memory-layer buffers; `mem_valid`/`compressed_mem_valid` count each row's valid slots.

    All memory layers always hold the same number of valid slots, so the counts (int32) are
    per row and shared by the layers. `mem_usage` exists only under compression="most_used":
    per memory slot, the attention it has received, summed over the full segments that read
    it (each averaged over heads and real queries); aligned with `mem`, zero on invalid slots.
    None otherwise (the pytree keeps a fixed structure per config).
    """

    mem: Float[Array, "l b m d"]
    compressed_mem: Float[Array, "l b c d"]
    mem_valid: Int[Array, " b"]
    compressed_mem_valid: Int[Array, " b"]
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
        return cls(zeros, czeros, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32), usage)

    @property
    def total_valid(self) -> Int[Array, " b"]:
        """Valid slots of one memory layer's `cmem|mem`, per row: the count that sets the position rows."""
        return self.mem_valid + self.compressed_mem_valid

    def layer(self, slot: int) -> LayerMemory:
        """The buffers and counts of memory layer `slot` (its index among the memory layers)."""
        usage = None if self.mem_usage is None else self.mem_usage[slot]
        return LayerMemory(self.mem[slot], self.compressed_mem[slot], self.mem_valid, self.compressed_mem_valid, usage)

    def slot_valid(self) -> Bool[Array, "b k"]:
        """Which slots of a memory layer's `cmem|mem` hold entries, per row (k = cmem_len + mem_len)."""
        return buffer_valid(self.compressed_mem.shape[2], self.compressed_mem_valid, self.mem.shape[2], self.mem_valid)

    def reset(self, rows: Bool[Array, " b"]) -> Memory:
        """The memory with `rows` emptied (buffers zeroed, counts 0), e.g. where a row's document ends."""
        rows = jnp.asarray(rows)
        if rows.shape != self.mem_valid.shape or rows.dtype != jnp.bool_:
            raise ValueError(
                f"rows must be a bool array of shape {self.mem_valid.shape}, got {rows.dtype} {rows.shape}"
            )
        keep = ~rows
        return Memory(
            jnp.where(keep[None, :, None, None], self.mem, 0).astype(self.mem.dtype),
            jnp.where(keep[None, :, None, None], self.compressed_mem, 0).astype(self.compressed_mem.dtype),
            jnp.where(keep, self.mem_valid, 0),
            jnp.where(keep, self.compressed_mem_valid, 0),
            None if self.mem_usage is None else jnp.where(keep[None, :, None], self.mem_usage, 0),
        )

    def knocked_out(self, part: str) -> Memory:
        """The memory with, in every row, its compressed part (`part="compressed"`) or all of it
        (`"memory"`) emptied: what the model predicts without it (the invariant holds, as after `reset`)."""
        if check_choice("knockout", part, KNOCKOUTS) == "memory":
            return self.reset(jnp.ones(self.mem_valid.shape, bool))
        return self._replace(compressed_mem=jnp.zeros_like(self.compressed_mem),
                             compressed_mem_valid=jnp.zeros_like(self.compressed_mem_valid))


class LayerMemory(NamedTuple):
    """One memory layer's part of `Memory`: what its attention reads and returns updated."""

    mem: Float[Array, "b m d"]
    compressed_mem: Float[Array, "b c d"]
    mem_valid: Int[Array, " b"]
    compressed_mem_valid: Int[Array, " b"]
    mem_usage: Float[Array, "b m"] | None = None  # compression="most_used" only (see Memory)

    def slot_valid(self) -> Bool[Array, "b k"]:
        """Which slots of `cmem|mem` hold entries, per row (k = c + m)."""
        return buffer_valid(self.compressed_mem.shape[1], self.compressed_mem_valid, self.mem.shape[1], self.mem_valid)


def valid_slots(length: int, valid: Int[Array, "*b"]) -> Bool[Array, "*b n"]:
    """Boolean mask of the right-aligned valid slots of a buffer: (length,) per count, (b, length) per row."""
    return jnp.arange(length) >= length - jnp.asarray(valid)[..., None]


def buffer_valid(
    n_cmem: int, cmem_valid: Int[Array, " b"], n_mem: int, mem_valid: Int[Array, " b"]
) -> Bool[Array, "b k"]:
    """The valid slots of `cmem|mem` per row (k = n_cmem + n_mem): the one mask of memory keys that
    attention, the segment forward's and the cached decoder's, applies."""
    return jnp.concatenate([valid_slots(n_cmem, cmem_valid), valid_slots(n_mem, mem_valid)], axis=-1)


def right_aligned_concat(
    first: Float[Array, "b n d"], first_valid: Int[Array, " b"], second: Float[Array, "b k d"],
    second_valid: Int[Array, " b"], out_len: int,
) -> Float[Array, "b o d"]:
    """Per row, the last `out_len` entries of (valid part of `first`) ++ (valid part of `second`).

    Both inputs hold their valid entries right-aligned; the result does too, with its
    invalid slots zeroed.
    """
    n, k = first.shape[1], second.shape[1]
    first_valid, second_valid = first_valid[:, None], second_valid[:, None]
    position = first_valid + second_valid - out_len + jnp.arange(out_len)  # (b, o): index into the valid sequence
    from_first = position < first_valid
    index = jnp.where(from_first, n - first_valid + position, n + k - second_valid + position - first_valid)
    both = jnp.concatenate([first, second], axis=1)
    gathered = jnp.take_along_axis(both, jnp.clip(index, 0, n + k - 1)[:, :, None], axis=1)
    return jnp.where((position >= 0)[:, :, None], gathered, 0).astype(first.dtype)


def eviction_padding(evicted_count, ratio: int, mode: str = "upstream"):
    """Zeros put left of `evicted_count` evicted slots: upstream's `e % ratio` or the exact `-e % ratio`."""
    return evicted_count % ratio if mode == "upstream" else -evicted_count % ratio


def max_compressed_per_segment(seq_len: int, ratio: int, padding: str = "upstream") -> int:
    """Most slots one segment can add to the compressed memory under a padding rule."""
    return max((e + eviction_padding(e, ratio, padding)) // ratio for e in range(seq_len + 1))


def evicted_windows(
    mem: Float[Array, "b m d"], mem_valid: Int[Array, " b"], x: Float[Array, "b t d"], mem_len: int, ratio: int,
    padding: str = "upstream",
) -> tuple[Float[Array, "b n r d"], Int[Array, " b"], Int[Array, " b"]]:
    """Groups of `ratio` evicted slots, right-aligned, as upstream's Conv1d would see them, per row.

    Upstream evicts `e = mem_valid + t - mem_len` slots, left-pads them with `e % ratio`
    zeros (its amount, kept for parity; `padding="exact"`: `-e % ratio`) and convolves
    with kernel = stride = ratio, dropping the incomplete tail. Returns (windows,
    number of evicted slots, number of valid windows), counts per row; invalid windows are zero.
    """
    t = x.shape[1]
    n_out = max_compressed_per_segment(t, ratio, padding)
    evicted_count = jnp.maximum(mem_valid + t - mem_len, 0)
    padded_len = evicted_count + eviction_padding(evicted_count, ratio, padding)
    n_windows = padded_len // ratio
    # mem|x holds the valid sequence right-aligned; its first t slots are the evicted region.
    evicted = jnp.concatenate([mem, x], axis=1)[:, :t]
    evicted = jnp.where(valid_slots(t, evicted_count)[:, :, None], evicted, 0)
    span = n_out * ratio
    padded = jnp.pad(evicted, ((0, 0), (span, 0), (0, 0)))
    used_end = t - padded_len % ratio  # windows end where the dropped tail begins
    # per row, padded[i] = evicted[i - span], so this is evicted[used_end - span : used_end]: the
    # n_out windows ending where the dropped tail begins, zeros left of the evicted region.
    window = jax.vmap(lambda row, end: jax.lax.dynamic_slice_in_dim(row, end, span, axis=0))(padded, used_end)
    windows = window.reshape(window.shape[0], n_out, ratio, window.shape[-1])
    windows = jnp.where(valid_slots(n_out, n_windows)[:, :, None, None], windows, 0)
    return windows, evicted_count, n_windows
