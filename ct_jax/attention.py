"""Self-attention over `cmem | mem | x` with relative positions, memory update and aux loss."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax import memory as memlib
from ct_jax.config import ModelConfig
from ct_jax.layers import ConvCompress, linear, wide


def masked_softmax(logits: Float[Array, "*lead k"], valid: Bool[Array, "*#lead k"]) -> Float[Array, "*lead k"]:
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


def position_window(
    pos_emb: Float[Array, "h r d"], first_row: Int[Array, ""] | int, width: int
) -> Float[Array, "h w d"]:
    """`width` rows of the position table starting at a traced row (zeros outside it)."""
    pad = width
    padded = jnp.pad(pos_emb, ((0, 0), (pad, pad), (0, 0)))
    return jax.lax.dynamic_slice_in_dim(padded, first_row + pad, width, axis=1)


def _scores(q: Float[Array, "b h n d"], k: Float[Array, "#b h j d"]) -> Float[Array, "b h n j"]:
    """q . k over d (`k` may be shared over the batch). One query row (the decoder's per-token
    case) as a multiply-reduce: it reads each cached key once, where a matmul would first copy
    the cache into its preferred layout."""
    if q.shape[2] == 1:
        return jnp.sum(q * k, axis=-1)[:, :, None, :]  # [b, h, 1, j]
    if k.shape[0] == 1 and q.shape[0] != 1:
        return jnp.einsum("bhid,hjd->bhij", q, k[0])  # [b, h, n, j]
    return jnp.einsum("bhid,bhjd->bhij", q, k)  # [b, h, n, j]


def _weighted(attn: Float[Array, "b h n j"], v: Float[Array, "b h j d"]) -> Float[Array, "b h n d"]:
    """Attention-weighted sum of values; one query row as a multiply-reduce (see `_scores`)."""
    if attn.shape[2] == 1:
        return jnp.sum(attn[:, :, 0, :, None] * v, axis=2)[:, :, None, :]  # [b, h, 1, d]
    return jnp.einsum("bhij,bhjd->bhid", attn, v)  # [b, h, n, d]


class SelfAttention(nnx.Module):
    """Upstream's `SelfAttention`, on fixed-shape memory buffers.

    The attention core (`queries`, `keys_values`, `attend` and, inside it, `content_logits`,
    `position_logits`, `visible`) serves both the segment forward (`__call__`) and the cached
    decoder (`ct_jax.generation`), which differ only in where keys and values come from.
    """

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

    def _heads(self, x: Float[Array, "b n hd"]) -> Float[Array, "b h n d"]:
        return rearrange(x, "b n (h d) -> b h n d", h=self.config.heads)

    def queries(self, x: Float[Array, "b n dim"]) -> Float[Array, "b h n dh"]:
        """The queries of `x` (layer-normed input), split into heads."""
        return self._heads(self.to_q(x.astype(self.dtype)))

    def keys_values(self, x: Float[Array, "b n dim"]) -> tuple[Float[Array, "b h n dh"], Float[Array, "b h n dh"]]:
        """Keys and values of `x` (layer-normed input or memory slots), split into heads."""
        k, v = jnp.split(self.to_kv(x.astype(self.dtype)), 2, axis=-1)
        return self._heads(k), self._heads(v)

    def content_logits(self, q: Float[Array, "b h n dh"], k: Float[Array, "b h j dh"]) -> Float[Array, "b h n j"]:
        """Scaled q . k of one block of keys."""
        return _scores(q, k) * self.config.dim_head**-0.5

    def position_logits(
        self,
        q: Float[Array, "b h n dh"],
        pos_emb: Float[Array, "h r dh"],
        *,
        total_mem_valid: Int[Array, "*rows"],
        n_buffer: int,
        first_query: Int[Array, ""] | int,
        keys: int,
    ) -> Float[Array, "b h n k"]:
        """Scaled q . P of queries at window positions [first_query, first_query + n) against
        the `keys` keys `cmem|mem|window` (n_buffer memory slots, then the window), shifted so
        that entry [a, p] is the logit of query a and key p.

        Key p, query first_query + a are d = n_buffer + first_query + a - p apart; upstream
        reads position row total_mem_valid + seq_len - 1 - d, so the rows drift while memory
        fills (kept). Visible pairs (p <= n_buffer + first_query + a) read window rows
        p + n - 1 - a <= n_buffer + first_query + n - 1 <= keys - 1, so `keys` rows suffice
        (not keys + n - 1): future pairs read wrapped values, which `visible` masks.
        """
        n = q.shape[2]
        first_row = total_mem_valid + self.config.seq_len - 1 - n_buffer - first_query - (n - 1)  # [] or [b]
        if jnp.ndim(first_row) == 0:  # one count for the batch (the decoder)
            window = position_window(pos_emb.astype(q.dtype), first_row, keys)[None]  # [1, h, keys, dh]
        else:  # rows holding different amounts of memory read different rows
            window = jax.vmap(position_window, in_axes=(None, 0, None))(pos_emb.astype(q.dtype), first_row, keys)
        pos_dots = _scores(q, window) * self.config.dim_head**-0.5  # [b, h, n, keys]
        return relative_shift(pos_dots, keys)

    @staticmethod
    def visible(
        n_buffer: int, first_query: Int[Array, ""] | int, n: int, window: int, mask: Bool[Array, "b s"] | None
    ) -> Bool[Array, "#b 1 n k"]:
        """Which keys of `cmem|mem|window` each of the n queries at window positions
        [first_query, first_query + n) sees: causal over the keys and, with a padding mask
        (True = real token, over the window), the outer product of the mask on the window
        keys; memory columns are visible to every query."""
        query_pos = n_buffer + first_query + jnp.arange(n)[:, None]
        key_pos = jnp.arange(n_buffer + window)[None, :]
        visible = (key_pos <= query_pos)[None, None]  # [1, 1, n, k]
        if mask is None:
            return visible
        query_mask = jax.lax.dynamic_slice_in_dim(mask, first_query, n, axis=1)
        pair_mask = query_mask[:, None, :, None] & mask[:, None, None, :]  # [b, 1, n, window]
        memory_columns = jnp.ones((mask.shape[0], 1, n, n_buffer), bool)
        return visible & jnp.concatenate([memory_columns, pair_mask], axis=-1)

    def attend(
        self,
        q: Float[Array, "b h n dh"],
        keys: Sequence[Float[Array, "b h _ dh"]],
        values: Sequence[Float[Array, "b h _ dh"]],
        *,
        pos_emb: Float[Array, "h r dh"],
        total_mem_valid: Int[Array, "*rows"],
        buffer_valid: Bool[Array, "*rows c"],
        first_query: Int[Array, ""] | int = 0,
        window_valid: Bool[Array, " s"] | None = None,
        mask: Bool[Array, "b s"] | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "b n dim"]:
        """Attention of queries at window positions [first_query, first_query + n) over the
        keys/values `cmem|mem|window`, given as consecutive blocks along the key axis (the
        forward passes one block, the decoder memory and window apart), then `to_out`.

        `buffer_valid`: which of the leading memory slots hold entries (`memory.buffer_valid`),
        with `total_mem_valid` either per row ((b, c) and (b,): rows holding different amounts
        of memory) or shared by the batch ((c,) and ());
        `window_valid`: which window slots hold tokens (None = all); `mask`: padding over the
        window, True = real token. Invalid slots get exactly zero weight.
        """
        n_keys = sum(k.shape[2] for k in keys)
        n_buffer = buffer_valid.shape[-1]
        n_window = n_keys - n_buffer
        dots = jnp.concatenate([self.content_logits(q, k) for k in keys], axis=-1)  # [b, h, n, keys]
        pos = self.position_logits(q, pos_emb, total_mem_valid=total_mem_valid, n_buffer=n_buffer,
                                   first_query=first_query, keys=n_keys)
        dots = (dots + pos).astype(wide(self.dtype))
        visible = self.visible(n_buffer, first_query, q.shape[2], n_window, mask)
        # Masked logits get -finfo.max as upstream (a fully masked row is uniform, not NaN);
        # slots not valid get exactly zero weight.
        dots = jnp.where(visible, dots, -jnp.finfo(dots.dtype).max)
        if window_valid is None:
            window_valid = jnp.ones((n_window,), bool)
        window_valid = jnp.broadcast_to(window_valid, (*buffer_valid.shape[:-1], n_window))
        slot_valid = jnp.concatenate([buffer_valid, window_valid], axis=-1)  # [c + s] or [b, c + s]
        slot_valid = slot_valid[None, None, None, :] if slot_valid.ndim == 1 else slot_valid[:, None, None, :]
        attn = masked_softmax(dots, slot_valid).astype(values[0].dtype)
        attn = self.attn_dropout(attn, rngs=rngs)
        offsets = np.cumsum([0] + [v.shape[2] for v in values])
        out = sum(_weighted(attn[..., lo:hi], v) for v, lo, hi in zip(values, offsets[:-1], offsets[1:]))
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.dropout(self.to_out(out), rngs=rngs)

    def __call__(
        self,
        x: Float[Array, "b t d"],
        pos_emb: Float[Array, "h r dh"],
        total_mem_valid: Int[Array, " b"],
        mask: Bool[Array, "b t"] | None = None,
        layer_memory: memlib.LayerMemory | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[Float[Array, "b t d"], memlib.LayerMemory | None, Float[Array, ""]]:
        """Returns (output, updated layer memory or None, aux loss).

        `x` is the layer-normed input; `layer_memory` is this layer's buffers and counts
        (None for a layer without memory); `total_mem_valid` is each row's valid length of
        the memory layers' `cmem|mem`, which sets that row's positional rows in every layer.
        Counts are per row: each row computes what it would alone.
        """
        config = self.config
        b, t, _ = x.shape
        x = x.astype(self.dtype)
        if layer_memory is None:
            mem = cmem = jnp.zeros((b, 0, x.shape[-1]), x.dtype)
            mem_valid = cmem_valid = jnp.zeros((b,), jnp.int32)
            buffer_valid = jnp.zeros((b, 0), bool)
        else:
            mem, cmem = layer_memory.mem.astype(x.dtype), layer_memory.compressed_mem.astype(x.dtype)
            mem_valid, cmem_valid = layer_memory.mem_valid, layer_memory.compressed_mem_valid
            buffer_valid = layer_memory.slot_valid()
        n_cmem, n_mem = cmem.shape[1], mem.shape[1]
        n_buffer = n_cmem + n_mem

        q = self.queries(x)
        k, v = self.keys_values(jnp.concatenate([cmem, mem, x], axis=1))  # [b, h, c+m+t, dh] each
        out = self.attend(q, [k], [v], pos_emb=pos_emb, total_mem_valid=total_mem_valid,
                          buffer_valid=buffer_valid, mask=mask, rngs=rngs)

        aux_loss = jnp.zeros((), wide(self.dtype))
        if layer_memory is None or t != config.seq_len:
            return out, layer_memory, aux_loss

        new_mem_valid = jnp.minimum(mem_valid + t, config.mem_len)
        new_mem = jnp.concatenate([mem, x], axis=1)[:, t:]
        new_mem = jnp.where(memlib.valid_slots(n_mem, new_mem_valid)[:, :, None], new_mem, 0)
        if config.cmem_len == 0:
            return out, memlib.LayerMemory(new_mem, cmem, new_mem_valid, cmem_valid), aux_loss

        windows, _, n_compressed = memlib.evicted_windows(mem, mem_valid, x, config.mem_len, config.cmem_ratio)
        compressed = self.compress_mem_fn(jax.lax.stop_gradient(windows))
        new_cmem = memlib.right_aligned_concat(cmem, cmem_valid, compressed, n_compressed, n_cmem)
        new_cmem_valid = jnp.minimum(cmem_valid + n_compressed, config.cmem_len)
        new_memory = memlib.LayerMemory(new_mem, jax.lax.stop_gradient(new_cmem), new_mem_valid, new_cmem_valid)
        if self.deterministic:
            return out, new_memory, aux_loss

        # Reconstruction loss: attention of the (frozen) queries over the whole current
        # memory (upstream's target, kept) vs over the new compressed slots, whose K/V use
        # a stop-gradient copy of to_kv (upstream's in-place detach_ froze to_kv; fixed).
        sg = jax.lax.stop_gradient
        q_sg = sg(q)
        mem_k, mem_v = sg(k[:, :, n_cmem:n_buffer]), sg(v[:, :, n_cmem:n_buffer])
        comp_kv = compressed @ sg(self.to_kv.kernel[...]).astype(compressed.dtype)  # [b, n, 2 * dim]
        comp_k, comp_v = map(self._heads, jnp.split(comp_kv, 2, axis=-1))
        target = self._full_attention(q_sg, mem_k, mem_v, memlib.valid_slots(n_mem, mem_valid), rngs)
        recon = self._full_attention(q_sg, comp_k, comp_v, memlib.valid_slots(compressed.shape[1], n_compressed), rngs)
        # per row (a row alone gives its own), 0 for rows that compressed nothing; the batch's is their mean
        mse = jnp.mean(jnp.square(target.astype(aux_loss.dtype) - recon.astype(aux_loss.dtype)), axis=(1, 2, 3))
        aux_loss = jnp.mean(jnp.where(n_compressed > 0, mse, 0.0))
        return out, new_memory, aux_loss

    def _full_attention(
        self,
        q: Float[Array, "b h t dh"],
        k: Float[Array, "b h j dh"],
        v: Float[Array, "b h j dh"],
        valid: Bool[Array, "b j"],
        rngs: nnx.Rngs | None,
    ) -> Float[Array, "b h t dh"]:
        """Unmasked attention over the valid slots, as upstream's `full_attn`."""
        dots = jnp.einsum("bhid,bhjd->bhij", q, k) * self.config.dim_head**-0.5  # [b, h, t, j]
        attn = masked_softmax(dots, valid[:, None, None, :]).astype(v.dtype)
        attn = self.reconstruction_attn_dropout(attn, rngs=rngs)
        return jnp.einsum("bhij,bhjd->bhid", attn, v)  # [b, h, t, dh]
