"""The memory after a full segment: the FIFO of `mem_len` slots, the evicted slots compressed
into the compressed memory, and the auxiliary loss that trains the compressor.

Upstream does this inside its attention layer; here it sits beside `ct_jax.memory`, reading
the attention layer's compressor parameters (`compress_mem_fn`, kept there for upstream's
state_dict layout). The rules (eviction padding, right alignment) are `ct_jax.memory`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax import aux_losses, compression
from ct_jax import memory as memlib
from ct_jax.layers import wide


def shifted_memory(layer_memory: memlib.LayerMemory, x: Float[Array, "b t d"], mem_len: int,
                   usage: Float[Array, "b m"] | None) -> memlib.LayerMemory:
    """`layer_memory` with the segment `x` pushed into its FIFO of `mem_len` slots (oldest out),
    and, with `usage` (most_used: each slot's summed attention, this segment's included), it
    shifted alongside."""
    t, n_mem = x.shape[1], layer_memory.mem.shape[1]
    new_mem_valid = jnp.minimum(layer_memory.mem_valid + t, mem_len)
    new_mem = jnp.concatenate([layer_memory.mem, x], axis=1)[:, t:]
    new_mem = jnp.where(memlib.valid_slots(n_mem, new_mem_valid)[:, :, None], new_mem, 0)
    if usage is not None:
        usage = jnp.concatenate([usage, jnp.zeros_like(usage[:, :t])], axis=1)[:, t:]
    return layer_memory._replace(mem=new_mem, mem_valid=new_mem_valid, mem_usage=usage)


def most_used_compressor(usage: Float[Array, "b m"], evicted_count: Int[Array, " b"], n_compressed: Int[Array, " b"],
                         n_out: int, t: int, mem_len: int, seq_len: int) -> Callable[[jax.Array], jax.Array]:
    """compression="most_used" as a compressor of the evicted region (the memory's first t slots,
    t <= mem_len): keeps the slots that received the most attention per read."""
    reads = compression.reads_per_slot(mem_len, seq_len)[:t]
    scores = usage[:, :t] / jnp.asarray(reads, usage.dtype)
    region_valid = memlib.valid_slots(t, evicted_count)  # (b, t)
    return functools.partial(compression.select_most_used, scores=scores, valid=region_valid, n_keep=n_compressed,
                             n_out=n_out)


def update_memory(
    attn: nnx.Module,  # the layer's `SelfAttention` (its parameters, config and mode)
    layer_memory: memlib.LayerMemory,
    x: Float[Array, "b t d"],
    q: Float[Array, "b h t dh"],
    buffer_k: Float[Array, "b h k dh"],
    buffer_v: Float[Array, "b h k dh"],
    probs: Float[Array, "b h t n"] | None,
    mask: Bool[Array, "b t"] | None,
    rngs: nnx.Rngs | None,
    *,
    memory_gradients: bool = False,
) -> tuple[memlib.LayerMemory, Float[Array, ""]]:
    """The memory of `attn`'s layer after the full segment `x`, and the auxiliary loss.

    `q`: the segment's queries; `buffer_k`/`buffer_v`: keys/values of `cmem|mem`; `probs`: the
    segment's attention probabilities over `cmem|mem|x` (most_used only, else None). The
    compressor reads stop-gradient memories unless `memory_gradients`.
    """
    config = attn.config
    mem, cmem = layer_memory.mem, layer_memory.compressed_mem
    n_cmem = cmem.shape[1]
    aux_loss = jnp.zeros((), wide(attn.dtype))
    sg = jax.lax.stop_gradient
    usage = None
    if probs is not None:  # add the attention each memory slot received now; invalid slots read 0
        read = compression.attention_received(probs[..., n_cmem : n_cmem + mem.shape[1]].astype(jnp.float32), mask)
        usage = layer_memory.mem_usage + read  # (b, m)
    new_memory = shifted_memory(layer_memory, x, config.mem_len, usage)
    if config.cmem_len == 0:
        return new_memory, aux_loss

    windows, evicted_count, n_compressed = memlib.evicted_windows(
        mem, layer_memory.mem_valid, x, config.mem_len, config.cmem_ratio, config.eviction_padding
    )
    if config.compression == "most_used":
        compress = most_used_compressor(usage, evicted_count, n_compressed, windows.shape[1], x.shape[1],
                                        config.mem_len, config.seq_len)
        source = mem[:, : x.shape[1]]
    else:
        compress, source = attn.compress_mem_fn, windows
    compressed = compress(source if memory_gradients else sg(source))  # (b, n_out, d)
    new_cmem = memlib.right_aligned_concat(cmem, layer_memory.compressed_mem_valid, compressed, n_compressed, n_cmem)
    new_memory = new_memory._replace(
        compressed_mem=new_cmem if memory_gradients else sg(new_cmem),
        compressed_mem_valid=jnp.minimum(layer_memory.compressed_mem_valid + n_compressed, config.cmem_len),
    )
    if attn.deterministic or config.aux_loss == "none":
        return new_memory, aux_loss
    # The aux loss trains the compressor only: it reads stop-gradient memories.
    aux_compressed = compress(sg(source)) if memory_gradients else compressed
    if config.aux_loss == "autoencoder":
        loss = aux_losses.autoencoder_loss(attn, aux_compressed, windows, n_compressed)
    else:
        loss = aux_losses.attention_reconstruction_loss(
            attn, q, buffer_k[:, :, n_cmem:], buffer_v[:, :, n_cmem:], aux_compressed, layer_memory.mem_valid,
            evicted_count, n_compressed, rngs,
        )
    return new_memory, loss.astype(aux_loss.dtype)
