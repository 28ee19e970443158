"""The auxiliary losses that train the compressor (docs/paper-options.md): upstream's attention
reconstruction and the paper's auto-encoding. Both read stop-gradient memories and queries,
so only the compressor learns from them; each is per row (a row alone gives its own, 0 for a
row that compressed nothing) and the batch's is the rows' mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax import memory as memlib
from ct_jax.layers import masked_softmax, wide


def full_attention(
    attn: nnx.Module, q: Float[Array, "b h t dh"], k: Float[Array, "b h j dh"], v: Float[Array, "b h j dh"],
    valid: Bool[Array, "b j"], rngs: nnx.Rngs | None,
) -> Float[Array, "b h t dh"]:
    """Unmasked attention over the valid slots, as upstream's `full_attn` (`attn`: the layer's
    `SelfAttention`, for its head size and reconstruction dropout)."""
    dots = jnp.einsum("bhid,bhjd->bhij", q, k) * attn.config.dim_head**-0.5  # [b, h, t, j]
    weights = masked_softmax(dots, valid[:, None, None, :]).astype(v.dtype)
    weights = attn.reconstruction_attn_dropout(weights, rngs=rngs)
    return jnp.einsum("bhij,bhjd->bhid", weights, v)  # [b, h, t, dh]


def _per_row_mean(per_row: Float[Array, " b"], n_compressed: Int[Array, " b"]) -> Float[Array, ""]:
    """The batch's loss: the rows' mean, 0 for rows that compressed nothing."""
    return jnp.mean(jnp.where(n_compressed > 0, per_row, 0.0))


def autoencoder_loss(
    attn: nnx.Module,  # the layer's `SelfAttention` (its decoder `decompress_mem_fn`)
    compressed: Float[Array, "b n d"],
    windows: Float[Array, "b n r d"],
    n_compressed: Int[Array, " b"],
) -> Float[Array, ""]:
    """The paper's auto-encoding loss: decode the compressed slots back to the windows they were
    made from (`memory.evicted_windows`), MSE over the valid windows."""
    dtype = wide(attn.dtype)
    decoded = attn.decompress_mem_fn(compressed).astype(dtype)  # (b, n, r, d)
    error = jnp.square(decoded - jax.lax.stop_gradient(windows).astype(dtype))
    error = jnp.where(memlib.valid_slots(compressed.shape[1], n_compressed)[:, :, None, None], error, 0.0)
    per_row = jnp.sum(error, axis=(1, 2, 3)) / (jnp.maximum(n_compressed, 1) * windows.shape[2] * windows.shape[3])
    return _per_row_mean(per_row, n_compressed)


def attention_reconstruction_loss(
    attn: nnx.Module,  # the layer's `SelfAttention` (its to_kv, heads and reconstruction dropout)
    q: Float[Array, "b h t dh"],
    mem_k: Float[Array, "b h m dh"],
    mem_v: Float[Array, "b h m dh"],
    compressed: Float[Array, "b n d"],
    mem_valid: Int[Array, " b"],
    evicted_count: Int[Array, " b"],
    n_compressed: Int[Array, " b"],
    rngs: nnx.Rngs | None,
) -> Float[Array, ""]:
    """Upstream's loss: the (frozen) queries `q` over the target memories (keys/values `mem_k`,
    `mem_v`) vs over the new compressed slots, MSE.

    The compressed slots' K/V use a stop-gradient copy of to_kv (upstream's in-place detach_
    froze to_kv; fixed). Target: the whole memory held (upstream) or the evicted slots only
    (reconstruction_target="evicted", the paper's).
    """
    sg = jax.lax.stop_gradient
    n_mem = mem_k.shape[2]
    target_valid = memlib.valid_slots(n_mem, mem_valid)
    if attn.config.reconstruction_target == "evicted":
        target_valid = target_valid & (jnp.arange(n_mem)[None, :] < (n_mem - mem_valid + evicted_count)[:, None])
    comp_kv = compressed @ sg(attn.to_kv.kernel[...]).astype(compressed.dtype)  # (b, n, 2 dim)
    comp_k, comp_v = map(attn.heads, jnp.split(comp_kv, 2, axis=-1))
    q_sg = sg(q)
    target = full_attention(attn, q_sg, sg(mem_k), sg(mem_v), target_valid, rngs)
    recon = full_attention(attn, q_sg, comp_k, comp_v, memlib.valid_slots(compressed.shape[1], n_compressed), rngs)
    dtype = wide(attn.dtype)
    mse = jnp.mean(jnp.square(target.astype(dtype) - recon.astype(dtype)), axis=(1, 2, 3))
    return _per_row_mean(mse, n_compressed)
