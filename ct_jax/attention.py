"""Self-attention over `cmem | mem | x` with relative positions, memory update and aux loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax import memory as memlib
from ct_jax.config import ModelConfig
from ct_jax.layers import ConvCompress, linear, wide


def masked_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax in (at least) float32 where `valid == False` entries get exactly zero weight.

    A row with no valid entry gives all zeros (torch's softmax over an empty axis
    followed by a matmul gives zeros too).
    """
    logits = logits.astype(wide(logits.dtype))
    masked = jnp.where(valid, logits, -jnp.inf)
    peak = jnp.max(masked, axis=-1, keepdims=True, initial=-jnp.inf)
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    weights = jnp.exp(masked - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def relative_shift(pos_logits: Float[Array, "b h t w"], keys: int) -> Float[Array, "b h t k"]:
    """out[..., a, p] = pos_logits[..., a, p + t - 1 - a]: Transformer-XL's skew, by reshapes.

    Exact where p + t - 1 - a < w (0 where it equals w); beyond that an entry wraps into
    the next row, so with w < keys + t - 1 the caller must mask those (future) entries.
    """
    *lead, t, width = pos_logits.shape
    padded = jnp.pad(pos_logits, [(0, 0)] * len(lead) + [(0, 0), (0, 1)])
    flat = padded.reshape(*lead, t * (width + 1))
    skewed = flat[..., t - 1 : t - 1 + t * width].reshape(*lead, t, width)
    return skewed[..., :keys]


def position_window(pos_emb: Float[Array, "h r d"], first_row, width: int) -> Float[Array, "h w d"]:
    """`width` rows of the position table starting at a traced row (zeros outside it)."""
    pad = width
    padded = jnp.pad(pos_emb, ((0, 0), (pad, pad), (0, 0)))
    return jax.lax.dynamic_slice_in_dim(padded, first_row + pad, width, axis=1)


class SelfAttention(nnx.Module):
    """Upstream's `SelfAttention`, on fixed-shape memory buffers."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        dim = config.dim
        self.config = config
        self.dtype = dtype
        self.compress_mem_fn = ConvCompress(dim, config.cmem_ratio, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = linear(dim, dim, use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_kv = linear(dim, 2 * dim, use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_out = linear(dim, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        maybe = lambda rate: rngs if rate > 0 else None  # noqa: E731
        self.attn_dropout = nnx.Dropout(config.attn_dropout, rngs=maybe(config.attn_dropout))
        self.dropout = nnx.Dropout(config.attn_layer_dropout, rngs=maybe(config.attn_layer_dropout))
        self.reconstruction_attn_dropout = nnx.Dropout(
            config.reconstruction_attn_dropout, rngs=maybe(config.reconstruction_attn_dropout)
        )
        self.deterministic = False  # torch modules start in training mode

    def _heads(self, x: jax.Array) -> jax.Array:
        return rearrange(x, "b n (h d) -> b h n d", h=self.config.heads)

    def __call__(
        self,
        x: Float[Array, "b t d"],
        pos_emb: Float[Array, "h r dh"],
        total_mem_valid: Int[Array, ""],
        mask: Bool[Array, "b t"] | None = None,
        layer_memory: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
        rngs: nnx.Rngs | None = None,
        *,
        memory_gradients: bool = False,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None, jax.Array]:
        """Returns (output, updated (mem, cmem, mem_valid, cmem_valid) or None, aux loss).

        `x` is the layer-normed input; `layer_memory` is this layer's buffers and counts
        (None for a layer without memory); `total_mem_valid` is the valid length of the
        memory layers' `cmem|mem`, which sets the positional rows for every layer.
        """
        config = self.config
        b, t, _ = x.shape
        scale = config.dim_head**-0.5
        x = x.astype(self.dtype)
        if layer_memory is None:
            mem = cmem = jnp.zeros((b, 0, x.shape[-1]), x.dtype)
            mem_valid = cmem_valid = jnp.zeros((), jnp.int32)
        else:
            mem, cmem, mem_valid, cmem_valid = layer_memory
            mem, cmem = mem.astype(x.dtype), cmem.astype(x.dtype)
        n_cmem, n_mem = cmem.shape[1], mem.shape[1]
        n_buffer = n_cmem + n_mem
        keys = n_buffer + t

        q = self._heads(self.to_q(x))
        kv_input = jnp.concatenate([cmem, mem, x], axis=1)
        k, v = jnp.split(self.to_kv(kv_input), 2, axis=-1)
        k, v = self._heads(k), self._heads(v)
        dots = jnp.einsum("bhid,bhjd->bhij", q, k) * scale

        # Key p, query a are d = n_buffer + a - p apart; upstream reads position row
        # total_mem_valid + seq_len - 1 - d, so the rows drift while memory fills (kept).
        # Visible pairs (p <= n_buffer + a) read window rows p + t - 1 - a <= keys - 1, so
        # `keys` rows suffice (not keys + t - 1): future pairs read wrapped values, which the
        # causal mask below overwrites. A third less q.P work and a smaller skew.
        first_row = total_mem_valid + config.seq_len - 1 - n_buffer - (t - 1)
        window = position_window(pos_emb.astype(q.dtype), first_row, keys)
        pos_dots = jnp.einsum("bhid,hjd->bhij", q, window) * scale
        dots = (dots + relative_shift(pos_dots, keys)).astype(wide(self.dtype))

        query_pos = n_buffer + jnp.arange(t)[:, None]
        key_pos = jnp.arange(keys)[None, :]
        visible = (key_pos <= query_pos)[None, None]  # causal over cmem|mem|x
        if mask is not None:
            # padding: outer product of the segment mask; memory columns visible to every query
            pair_mask = mask[:, None, :, None] & mask[:, None, None, :]
            pad_mask = jnp.concatenate([jnp.ones((b, 1, t, n_buffer), bool), pair_mask], axis=-1)
            visible = visible & pad_mask
        # Masked logits get -finfo.max as upstream (a fully masked row is uniform, not NaN);
        # buffer slots not yet valid get exactly zero weight.
        dots = jnp.where(visible, dots, -jnp.finfo(dots.dtype).max)
        slot_valid = jnp.concatenate(
            [memlib.valid_slots(n_cmem, cmem_valid), memlib.valid_slots(n_mem, mem_valid), jnp.ones((t,), bool)]
        )
        attn = masked_softmax(dots, slot_valid[None, None, None, :]).astype(v.dtype)
        attn = self.attn_dropout(attn, rngs=rngs)
        out = rearrange(jnp.einsum("bhij,bhjd->bhid", attn, v), "b h t d -> b t (h d)")
        out = self.dropout(self.to_out(out), rngs=rngs)

        aux_loss = jnp.zeros((), wide(self.dtype))
        if layer_memory is None or t != config.seq_len:
            return out, layer_memory, aux_loss

        new_mem_valid = jnp.minimum(mem_valid + t, config.mem_len)
        new_mem = jnp.concatenate([mem, x], axis=1)[:, t:]
        new_mem = jnp.where(memlib.valid_slots(n_mem, new_mem_valid)[None, :, None], new_mem, 0)
        if config.cmem_len == 0:
            return out, (new_mem, cmem, new_mem_valid, cmem_valid), aux_loss

        windows, _, n_compressed = memlib.evicted_windows(mem, mem_valid, x, config.mem_len, config.cmem_ratio)
        # The compressor reads stop-gradient memories unless memory gradients are on.
        compressed = self.compress_mem_fn(windows if memory_gradients else jax.lax.stop_gradient(windows))
        new_cmem = memlib.right_aligned_concat(cmem, cmem_valid, compressed, n_compressed, n_cmem)
        new_cmem_valid = jnp.minimum(cmem_valid + n_compressed, config.cmem_len)
        new_cmem = new_cmem if memory_gradients else jax.lax.stop_gradient(new_cmem)
        new_memory = (new_mem, new_cmem, new_mem_valid, new_cmem_valid)
        if self.deterministic:
            return out, new_memory, aux_loss

        # Reconstruction loss: attention of the (frozen) queries over the whole current
        # memory (upstream's target, kept) vs over the new compressed slots, whose K/V use
        # a stop-gradient copy of to_kv (upstream's in-place detach_ froze to_kv; fixed).
        sg = jax.lax.stop_gradient
        q_sg = sg(q)
        mem_k, mem_v = sg(k[:, :, n_cmem:n_buffer]), sg(v[:, :, n_cmem:n_buffer])
        if memory_gradients:  # the aux loss still trains the compressor only
            compressed = self.compress_mem_fn(sg(windows))
        comp_kv = compressed @ sg(self.to_kv.kernel[...]).astype(compressed.dtype)
        comp_k, comp_v = map(self._heads, jnp.split(comp_kv, 2, axis=-1))
        target = self._full_attention(q_sg, mem_k, mem_v, memlib.valid_slots(n_mem, mem_valid), rngs)
        recon = self._full_attention(q_sg, comp_k, comp_v, memlib.valid_slots(compressed.shape[1], n_compressed), rngs)
        mse = jnp.mean(jnp.square(target.astype(aux_loss.dtype) - recon.astype(aux_loss.dtype)))
        aux_loss = jnp.where(n_compressed > 0, mse, 0.0)
        return out, new_memory, aux_loss

    def _full_attention(self, q, k, v, valid, rngs) -> jax.Array:
        """Unmasked attention over the valid slots, as upstream's `full_attn`."""
        dots = jnp.einsum("bhid,bhjd->bhij", q, k) * self.config.dim_head**-0.5
        attn = masked_softmax(dots, valid[None, None, None, :]).astype(v.dtype)
        attn = self.reconstruction_attn_dropout(attn, rngs=rngs)
        return jnp.einsum("bhij,bhjd->bhid", attn, v)
