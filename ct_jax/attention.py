"""The attention core: queries over `cmem | mem | window` keys with relative positions.

One path for the segment forward and the cached decoder: they differ only in where the
keys and values come from (`SelfAttention.__call__` with or without a `LayerCache`). The
memory update lives in `ct_jax.memory_update`, the auxiliary losses in `ct_jax.aux_losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax import compression, memory_update
from ct_jax import memory as memlib
from ct_jax._checks import check_choice
from ct_jax.config import ModelConfig
from ct_jax.layers import linear, masked_softmax, wide
from ct_jax.positions import sinusoid_table

# `attention_impl`: "xla" computes the scores, the masked softmax and the value product as
# separate ops (the default); "fused" hands them to `jax.nn.dot_product_attention` (cuDNN on a
# GPU in 16-bit compute), with the position logits and the masks as its additive bias.
ATTENTION_IMPLS = ("xla", "fused")
# The fused path's bias for keys a query may not see, and for buffer slots that hold nothing.
# Finite, far apart: a row with no visible key stays uniform over its valid slots (upstream's
# -finfo.max), and invalid slots still get exactly zero weight (exp underflows) in every row.
_F32_MAX = float(np.finfo(np.float32).max)
_HIDDEN_BIAS = -0.25 * _F32_MAX
_INVALID_BIAS = -0.75 * _F32_MAX


class Attended(NamedTuple):
    """What `SelfAttention.attend` returns."""

    out: Float[Array, "b n dim"]  # after `to_out` and its dropout
    probs: Float[Array, "b h n k"] | None  # the attention probabilities (before dropout), if asked


class LayerCache(NamedTuple):
    """One layer's state in the cached decoder (`ct_jax.generation`): the keys/values of the
    window's tokens so far and, for a memory layer, of its `cmem|mem` (computed once per window).

    Rows r are the batch's, or (from the first memory layer up) the decoder's variants of each
    row stacked variant-major on the batch axis (see `ct_jax.generation`).
    """

    k: Float[Array, "r h s dh"]  # the window's keys, s = seq_len slots
    v: Float[Array, "r h s dh"]
    memory_k: Float[Array, "r h m dh"] | None  # keys of cmem|mem; None for a layer without memory
    memory_v: Float[Array, "r h m dh"] | None
    # Per row, or one row for all (a generation advances every row by the same windows): which
    # cmem|mem slots hold entries, and the memory layers' valid cmem|mem length (sets the position rows).
    memory_valid: Bool[Array, "#r m"] | None
    total_valid: Int[Array, " #r"]
    start: Int[Array, ""]  # window position of the first token run now
    end: Int[Array, "*r"]  # tokens in the window once these are written (or per row); later slots get zero weight


class AttentionOutput(NamedTuple):
    """What `SelfAttention.__call__` returns."""

    out: Float[Array, "b t d"]
    memory: memlib.LayerMemory | None  # the layer's memory after this segment (None: no memory)
    aux_loss: Float[Array, ""]
    cache: LayerCache | None  # the decoder's cache with this call's keys/values written
    # Asked for (`attention_mass`): the attention on compressed memory, memory and the segment,
    # each query's averaged over heads, summed over the real queries (Sonnet's `export_stats`).
    mass: Float[Array, " 3"] | None = None


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


def attention_mass(
    probs: Float[Array, "b h t k"], n_cmem: int, n_mem: int, mask: Bool[Array, "b t"] | None
) -> Float[Array, " 3"]:
    """The probability mass on `cmem | mem | segment` (the key axis's three blocks), averaged over
    heads and summed over the real (mask True) queries: divided by their number, the mean mass."""
    per_query = jnp.mean(probs.astype(jnp.float32), axis=1)  # [b, t, k]
    ends = (n_cmem, n_cmem + n_mem, per_query.shape[-1])
    blocks = jnp.stack([jnp.sum(per_query[..., start:end], axis=-1) for start, end in zip((0, *ends[:2]), ends)],
                       axis=-1)  # [b, t, 3]
    if mask is not None:
        blocks = jnp.where(mask[..., None], blocks, 0.0)
    return jnp.sum(blocks, axis=(0, 1))


def position_window(
    pos_emb: Float[Array, "h r d"], first_row: Int[Array, ""] | int, width: int
) -> Float[Array, "h w d"]:
    """`width` rows of the position table starting at a traced row (zeros outside it)."""
    pad = width
    padded = jnp.pad(pos_emb, ((0, 0), (pad, pad), (0, 0)))
    return jax.lax.dynamic_slice_in_dim(padded, first_row + pad, width, axis=1)


def visible(
    n_buffer: int, first_query: Int[Array, ""] | int, n: int, window: int, mask: Bool[Array, "b s"] | None
) -> Bool[Array, "#b 1 n k"]:
    """Which keys of `cmem|mem|window` each of the n queries at window positions
    [first_query, first_query + n) sees: causal over the keys and, with a padding mask
    (True = real token, over the window), the outer product of the mask on the window
    keys; memory columns are visible to every query."""
    query_pos = n_buffer + first_query + jnp.arange(n)[:, None]
    key_pos = jnp.arange(n_buffer + window)[None, :]
    causal = (key_pos <= query_pos)[None, None]  # [1, 1, n, k]
    if mask is None:
        return causal
    query_mask = jax.lax.dynamic_slice_in_dim(mask, first_query, n, axis=1)
    pair_mask = query_mask[:, None, :, None] & mask[:, None, None, :]  # [b, 1, n, window]
    memory_columns = jnp.ones((mask.shape[0], 1, n, n_buffer), bool)
    return causal & jnp.concatenate([memory_columns, pair_mask], axis=-1)


def scores(q: Float[Array, "b h n d"], k: Float[Array, "#b h j d"]) -> Float[Array, "b h n j"]:
    """q . k over d (`k` may be shared over the batch). One query row (the decoder's per-token
    case) as a multiply-reduce: it reads each cached key once, where a matmul would first copy
    the cache into its preferred layout."""
    if q.shape[2] == 1:
        return jnp.sum(q * k, axis=-1)[:, :, None, :]  # [b, h, 1, j]
    if k.shape[0] == 1 and q.shape[0] != 1:
        return jnp.einsum("bhid,hjd->bhij", q, k[0])  # [b, h, n, j]
    return jnp.einsum("bhid,bhjd->bhij", q, k)  # [b, h, n, j]


def weighted(attn: Float[Array, "b h n j"], v: Float[Array, "b h j d"]) -> Float[Array, "b h n d"]:
    """Attention-weighted sum of values; one query row as a multiply-reduce (see `scores`)."""
    if attn.shape[2] == 1:
        return jnp.sum(attn[:, :, 0, :, None] * v, axis=2)[:, :, None, :]  # [b, h, 1, d]
    return jnp.einsum("bhij,bhjd->bhid", attn, v)  # [b, h, n, d]


def weighted_blocks(attn: Float[Array, "b h n k"], values: Sequence[Float[Array, "b h _ d"]]
                    ) -> Float[Array, "b h n d"]:
    """`weighted` over values given as consecutive blocks of the key axis (no concatenation)."""
    ends = np.cumsum([v.shape[2] for v in values])
    return sum(weighted(attn[..., end - v.shape[2] : end], v) for v, end in zip(values, ends))


def slots_valid(buffer_valid: Bool[Array, "#b c"], n_window: int, window_valid: Bool[Array, "*r s"] | None
                ) -> Bool[Array, "#b 1 1 k"]:
    """Which keys of `cmem|mem|window` hold entries, per row: the valid memory slots, then the
    window's (`window_valid`, None = all)."""
    if window_valid is None:
        window_valid = jnp.ones((n_window,), bool)
    window_valid = jnp.broadcast_to(window_valid, (buffer_valid.shape[0], n_window))
    return jnp.concatenate([buffer_valid, window_valid], axis=-1)[:, None, None, :]


def fused_attention(
    q: Float[Array, "b h n dh"], k: Float[Array, "b h k dh"], v: Float[Array, "b h k dh"],
    bias: Float[Array, "b h n k"], scale: float,
) -> Float[Array, "b n h dh"]:
    """softmax(q.k * scale + bias) v through `jax.nn.dot_product_attention` (cuDNN's flash
    attention on a GPU in 16-bit compute where it takes the shapes, XLA's otherwise)."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [b, h, n, dh] -> [b, n, h, dh]
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:  # cuDNN refuses some shapes (head dim, odd lengths) at trace time
            return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=scale,
                                                implementation="cudnn")
        except (NotImplementedError, ValueError):
            pass
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale)  # [b, n, h, dh]


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    """A dropout layer; one with rate 0 holds no random stream."""
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


def _uv_bias(config: ModelConfig, param_dtype) -> nnx.Param | None:
    """Transformer-XL's content (u) or position (v) bias per head; None under learned positions."""
    if config.relative_positions != "sinusoidal":
        return None
    return nnx.Param(jnp.zeros((config.heads, config.dim_head), param_dtype))


class SelfAttention(nnx.Module):
    """Upstream's `SelfAttention` on fixed-shape memory buffers, with the paper's options.

    Holds the parameters of its memory's compressor and auxiliary loss (upstream's state_dict
    layout); `ct_jax.memory_update` and `ct_jax.aux_losses` use them.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "xla"):
        dim = config.dim
        self.config = config
        self.dtype = dtype
        self.attention_impl = check_choice("attention_impl", attention_impl, ATTENTION_IMPLS)
        opts = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.compress_mem_fn = compression.make_compressor(config.compression, dim, config.cmem_ratio, **opts)
        self.to_q = linear(dim, dim, use_bias=False, **opts)
        self.to_kv = linear(dim, 2 * dim, use_bias=False, **opts)
        self.to_out = linear(dim, dim, **opts)
        self.attn_dropout = _dropout(config.attn_dropout, rngs)
        self.dropout = _dropout(config.attn_layer_dropout, rngs)
        self.reconstruction_attn_dropout = _dropout(config.reconstruction_attn_dropout, rngs)
        self.decompress_mem_fn = (
            compression.ConvDecompress(dim, config.cmem_ratio, **opts) if config.aux_loss == "autoencoder" else None
        )
        # Transformer-XL: projection of the sinusoids, content bias u, position bias v.
        sinusoidal = config.relative_positions == "sinusoidal"
        self.to_pos = linear(dim, dim, use_bias=False, **opts) if sinusoidal else None
        self.pos_bias_u, self.pos_bias_v = _uv_bias(config, param_dtype), _uv_bias(config, param_dtype)
        self.deterministic = False  # torch modules start in training mode

    def heads(self, x: Float[Array, "b n hd"]) -> Float[Array, "b h n d"]:
        """Splits the last axis into heads."""
        return rearrange(x, "b n (h d) -> b h n d", h=self.config.heads)

    def queries(self, x: Float[Array, "b n dim"]) -> Float[Array, "b h n dh"]:
        """The queries of `x` (layer-normed input), split into heads."""
        return self.heads(self.to_q(x.astype(self.dtype)))

    def keys_values(self, x: Float[Array, "b n dim"]) -> tuple[Float[Array, "b h n dh"], Float[Array, "b h n dh"]]:
        """Keys and values of `x` (layer-normed input or memory slots), split into heads."""
        k, v = jnp.split(self.to_kv(x.astype(self.dtype)), 2, axis=-1)
        return self.heads(k), self.heads(v)

    def position_logits(
        self, q: Float[Array, "b h n dh"], pos_emb: Float[Array, "h r dh"] | None, *,
        total_mem_valid: Int[Array, " #b"], n_buffer: int, first_query: Int[Array, ""] | int, keys: int,
    ) -> Float[Array, "b h n k"]:
        """Scaled q . P of the queries at window positions first_query + a against the keys p of
        `cmem|mem|window` (n_buffer memory slots first), d = n_buffer + first_query + a - p apart:
        upstream reads row total_mem_valid + seq_len - 1 - d (drifts while memory fills; kept).
        Visible pairs read window rows <= keys - 1; future pairs read wrapped values (`visible`
        masks them). Sinusoidal: the projected sinusoid of min(d, clamp_len) (no drift; `q` carries the bias v).
        """
        n, seq_len = q.shape[2], self.config.seq_len
        if self.config.relative_positions == "sinusoidal":
            # Static distances n_buffer + seq_len - 1 .. 0, the same for every row; rows past them
            # (future keys of the decoder's window, masked) read zeros.
            table = sinusoid_table(n_buffer + seq_len, self.config.dim, self.config.clamp_len)
            table = jnp.asarray(table, self.dtype)
            rows = position_window(table[None], seq_len - first_query - n, keys)[0]  # [keys, dim]
            window = self.heads(self.to_pos(rows)[None])  # [1, h, keys, dh]
        else:  # rows holding different amounts of memory read different rows
            first_row = total_mem_valid + seq_len - 1 - n_buffer - first_query - (n - 1)  # [b], or [1] for all rows
            window = jax.vmap(position_window, in_axes=(None, 0, None))(pos_emb.astype(q.dtype), first_row, keys)
        return relative_shift(scores(q, window) * self.config.dim_head**-0.5, keys)  # [b, h, n, keys]

    def attend(
        self, q: Float[Array, "b h n dh"], keys: Sequence[Float[Array, "b h _ dh"]],
        values: Sequence[Float[Array, "b h _ dh"]], *, pos_emb: Float[Array, "h r dh"] | None,
        total_mem_valid: Int[Array, " #b"], buffer_valid: Bool[Array, "#b c"], first_query: Int[Array, ""] | int = 0,
        window_valid: Bool[Array, "*r s"] | None = None, mask: Bool[Array, "b s"] | None = None,
        rngs: nnx.Rngs | None = None, with_probs: bool = False,
    ) -> Attended:
        """Attention of queries at window positions [first_query, first_query + n) over the keys/
        values `cmem|mem|window`, given as consecutive blocks along the key axis (the forward
        passes one block, the decoder memory and window apart), then `to_out`.

        `buffer_valid`/`total_mem_valid`: each row's valid memory slots and their count (one row
        broadcasts to all: the decoder's, whose rows hold equal memory);
        `window_valid`: which window slots hold tokens (None = all); `mask`: padding over the
        window, True = real token. Invalid slots get exactly zero weight. `with_probs` runs the
        "xla" path (`fuses`) and returns the probabilities too.
        """
        n_keys, n_buffer = sum(k.shape[2] for k in keys), buffer_valid.shape[1]
        content_q = position_q = q
        if self.config.relative_positions == "sinusoidal":  # Transformer-XL: (q + u) . k + (q + v) . R
            content_q = q + self.pos_bias_u[...].astype(q.dtype)[None, :, None, :]
            position_q = q + self.pos_bias_v[...].astype(q.dtype)[None, :, None, :]
        pos = self.position_logits(position_q, pos_emb, total_mem_valid=total_mem_valid, n_buffer=n_buffer,
                                   first_query=first_query, keys=n_keys)
        seen = visible(n_buffer, first_query, q.shape[2], n_keys - n_buffer, mask)
        slot_valid = slots_valid(buffer_valid, n_keys - n_buffer, window_valid)
        scale, probs = self.config.dim_head**-0.5, None
        if self.fuses(with_probs):
            bias = jnp.where(slot_valid, jnp.where(seen, pos.astype(wide(self.dtype)), _HIDDEN_BIAS), _INVALID_BIAS)
            k, v = (blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=2) for blocks in (keys, values))
            out = rearrange(fused_attention(content_q, k, v, bias, scale), "b n h d -> b n (h d)")
        else:
            dots = jnp.concatenate([scores(content_q, k) for k in keys], axis=-1)  # [b, h, n, keys]
            dots = (dots * scale + pos).astype(wide(self.dtype))
            # Masked logits get -finfo.max as upstream (a fully masked row is uniform, not NaN);
            # slots not valid get exactly zero weight.
            dots = jnp.where(seen, dots, -jnp.finfo(dots.dtype).max)
            probs = masked_softmax(dots, slot_valid).astype(values[0].dtype)
            out = rearrange(weighted_blocks(self.attn_dropout(probs, rngs=rngs), values), "b h n d -> b n (h d)")
        out = self.dropout(self.to_out(out), rngs=rngs)
        return Attended(out, probs if with_probs else None)

    def fuses(self, with_probs: bool = False) -> bool:
        """Whether `attend` takes the fused path now: attention_impl="fused", no attention
        dropout in the current mode, and no probabilities asked for (compression="most_used"
        reads them at full segments). Otherwise the "xla" path runs, with the same values."""
        dropout_on = self.config.attn_dropout > 0 and not self.attn_dropout.deterministic
        return self.attention_impl == "fused" and not dropout_on and not with_probs

    def __call__(
        self, x: Float[Array, "b t d"], pos_emb: Float[Array, "h r dh"] | None, total_mem_valid: Int[Array, " #b"],
        mask: Bool[Array, "b s"] | None = None, layer_memory: memlib.LayerMemory | None = None,
        rngs: nnx.Rngs | None = None, *, memory_gradients: bool = False, cache: LayerCache | None = None,
        mass: bool = False,
    ) -> AttentionOutput:
        """Attention of `x` (the layer-normed input) over its layer's memory and window.

        Without `cache`, `x` is a segment and `layer_memory` this layer's buffers and counts
        (None without memory); at a full segment the memory is updated (`memory_update`). With
        `cache` (the decoder), `x` holds window positions [cache.start, ...), keys and values
        come from the cache, `mask` covers the window and the memory is not touched.
        `total_mem_valid`: per row (or one for all), the memory layers' valid `cmem|mem` length (sets the
        learned position rows in every layer). `memory_gradients`: the memory keeps its gradient.
        `mass` (segments only): the output carries `attention_mass` (the "xla" path runs then).
        """
        x = x.astype(self.dtype)
        q = self.queries(x)
        if cache is not None:
            return self._cached(x, q, pos_emb, total_mem_valid, mask, cache)
        b, t, _ = x.shape
        if layer_memory is None:
            layer_memory_in, buffers, buffer_valid = None, [], jnp.zeros((b, 0), bool)
        else:  # the buffers in the compute dtype
            layer_memory_in = layer_memory._replace(mem=layer_memory.mem.astype(x.dtype),
                                                    compressed_mem=layer_memory.compressed_mem.astype(x.dtype))
            buffers, buffer_valid = [layer_memory_in.compressed_mem, layer_memory_in.mem], layer_memory.slot_valid()
        k, v = self.keys_values(jnp.concatenate([*buffers, x], axis=1))  # [b, h, c+m+t, dh] each
        n_buffer = buffer_valid.shape[1]
        updates = layer_memory is not None and t == self.config.seq_len
        most_used = updates and self.config.compression == "most_used"  # the attention each slot received
        attended = self.attend(q, [k], [v], pos_emb=pos_emb, total_mem_valid=total_mem_valid,
                               buffer_valid=buffer_valid, mask=mask, rngs=rngs, with_probs=most_used or mass)
        n_cmem = 0 if layer_memory is None else layer_memory.compressed_mem.shape[1]
        masses = attention_mass(attended.probs, n_cmem, n_buffer - n_cmem, mask) if mass else None
        if not updates:
            return AttentionOutput(attended.out, layer_memory, jnp.zeros((), wide(self.dtype)), None, masses)
        new_memory, aux_loss = memory_update.update_memory(
            self, layer_memory_in, x, q, k[:, :, :n_buffer], v[:, :, :n_buffer],
            attended.probs if most_used else None, mask, rngs, memory_gradients=memory_gradients,
        )
        return AttentionOutput(attended.out, new_memory, aux_loss, None, masses)

    def _cached(
        self, x: Float[Array, "r n d"], q: Float[Array, "r h n dh"], pos_emb: Float[Array, "h q dh"] | None,
        total_mem_valid: Int[Array, " #r"], mask: Bool[Array, "r s"] | None, cache: LayerCache,
    ) -> AttentionOutput:
        """`__call__` from the decoder's cache: this call's keys/values are written into the window's
        slots and the memory and window keys stay apart (no per-token concatenation of the caches)."""
        k_new, v_new = self.keys_values(x)
        k = jax.lax.dynamic_update_slice_in_dim(cache.k, k_new.astype(cache.k.dtype), cache.start, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(cache.v, v_new.astype(cache.v.dtype), cache.start, axis=2)
        window_valid = jnp.arange(self.config.seq_len) < cache.end[..., None]  # [s], or [r, s] per row
        if cache.memory_k is None:
            keys, values, buffer_valid = [k], [v], jnp.zeros((total_mem_valid.shape[0], 0), bool)
        else:
            keys, values, buffer_valid = [cache.memory_k, k], [cache.memory_v, v], cache.memory_valid
        attended = self.attend(q, keys, values, pos_emb=pos_emb, total_mem_valid=total_mem_valid,
                               buffer_valid=buffer_valid, first_query=cache.start, window_valid=window_valid,
                               mask=mask)
        return AttentionOutput(attended.out, None, jnp.zeros((), wide(self.dtype)), cache._replace(k=k, v=v))
