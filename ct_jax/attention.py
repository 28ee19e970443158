"""Self-attention over `cmem | mem | x` with relative positions, memory update and aux loss
(upstream's, and the paper-faithful options of docs/paper-options.md)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax import compression
from ct_jax import memory as memlib
from ct_jax._checks import check_choice
from ct_jax.config import ModelConfig
from ct_jax.layers import linear, wide
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
    """Upstream's `SelfAttention`, on fixed-shape memory buffers, with the paper's options.

    The attention core (`queries`, `keys_values`, `attend` and, inside it, `content_logits`,
    `position_logits`, `visible`) serves both the segment forward (`__call__`) and the cached
    decoder (`ct_jax.generation`), which differ only in where keys and values come from.
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
        maybe = lambda rate: rngs if rate > 0 else None  # noqa: E731
        self.attn_dropout = nnx.Dropout(config.attn_dropout, rngs=maybe(config.attn_dropout))
        self.dropout = nnx.Dropout(config.attn_layer_dropout, rngs=maybe(config.attn_layer_dropout))
        self.reconstruction_attn_dropout = nnx.Dropout(
            config.reconstruction_attn_dropout, rngs=maybe(config.reconstruction_attn_dropout)
        )
        self.decompress_mem_fn = (
            compression.ConvDecompress(dim, config.cmem_ratio, **opts) if config.aux_loss == "autoencoder" else None
        )
        sinusoidal = config.relative_positions == "sinusoidal"
        # Transformer-XL: projection of the sinusoids, content bias u, position bias v.
        self.to_pos = linear(dim, dim, use_bias=False, **opts) if sinusoidal else None
        bias = lambda: nnx.Param(jnp.zeros((config.heads, config.dim_head), param_dtype)) if sinusoidal else None  # noqa: E731
        self.pos_bias_u, self.pos_bias_v = bias(), bias()
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
        pos_emb: Float[Array, "h r dh"] | None,
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

        relative_positions="sinusoidal": window row j holds the projected sinusoid of the
        distance n_buffer + first_query + n - 1 - j (no drift; `q` carries the bias v).
        """
        n, seq_len = q.shape[2], self.config.seq_len
        if self.config.relative_positions == "sinusoidal":
            # Static table of distances n_buffer + seq_len - 1 .. 0; rows past it (future keys
            # of the decoder's window, masked) read zeros. The same rows for every batch row.
            table = jnp.asarray(sinusoid_table(n_buffer + seq_len, self.config.dim), self.dtype)
            rows = position_window(table[None], seq_len - first_query - n, keys)[0]  # [keys, dim]
            window = self._heads(self.to_pos(rows)[None])  # [1, h, keys, dh]
        else:
            first_row = total_mem_valid + seq_len - 1 - n_buffer - first_query - (n - 1)  # [] or [b]
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
        pos_emb: Float[Array, "h r dh"] | None,
        total_mem_valid: Int[Array, "*rows"],
        buffer_valid: Bool[Array, "*rows c"],
        first_query: Int[Array, ""] | int = 0,
        window_valid: Bool[Array, " s"] | None = None,
        mask: Bool[Array, "b s"] | None = None,
        rngs: nnx.Rngs | None = None,
        with_probs: bool = False,
    ) -> Float[Array, "b n dim"] | tuple[Float[Array, "b n dim"], Float[Array, "b h n k"]]:
        """Attention of queries at window positions [first_query, first_query + n) over the
        keys/values `cmem|mem|window`, given as consecutive blocks along the key axis (the
        forward passes one block, the decoder memory and window apart), then `to_out`.

        `buffer_valid`: which of the leading memory slots hold entries (`memory.buffer_valid`),
        with `total_mem_valid` either per row ((b, c) and (b,): rows holding different amounts
        of memory) or shared by the batch ((c,) and ());
        `window_valid`: which window slots hold tokens (None = all); `mask`: padding over the
        window, True = real token. Invalid slots get exactly zero weight. `with_probs`: also
        return the attention probabilities (before dropout); the fused path cannot, so asking
        for them runs the "xla" path (`fuses`).
        """
        n_keys = sum(k.shape[2] for k in keys)
        n_buffer = buffer_valid.shape[-1]
        n_window = n_keys - n_buffer
        content_q = position_q = q
        if self.config.relative_positions == "sinusoidal":  # Transformer-XL: (q + u) . k + (q + v) . R
            content_q = q + self.pos_bias_u[...].astype(q.dtype)[None, :, None, :]
            position_q = q + self.pos_bias_v[...].astype(q.dtype)[None, :, None, :]
        pos = self.position_logits(position_q, pos_emb, total_mem_valid=total_mem_valid, n_buffer=n_buffer,
                                   first_query=first_query, keys=n_keys)
        visible = self.visible(n_buffer, first_query, q.shape[2], n_window, mask)
        if window_valid is None:
            window_valid = jnp.ones((n_window,), bool)
        window_valid = jnp.broadcast_to(window_valid, (*buffer_valid.shape[:-1], n_window))
        slot_valid = jnp.concatenate([buffer_valid, window_valid], axis=-1)  # [c + s] or [b, c + s]
        slot_valid = slot_valid[None, None, None, :] if slot_valid.ndim == 1 else slot_valid[:, None, None, :]
        if self.fuses(with_probs):
            return self._fused_attend(content_q, keys, values, pos, visible, slot_valid, rngs)
        dots = jnp.concatenate([self.content_logits(content_q, k) for k in keys], axis=-1)  # [b, h, n, keys]
        dots = (dots + pos).astype(wide(self.dtype))
        # Masked logits get -finfo.max as upstream (a fully masked row is uniform, not NaN);
        # slots not valid get exactly zero weight.
        dots = jnp.where(visible, dots, -jnp.finfo(dots.dtype).max)
        probs = masked_softmax(dots, slot_valid).astype(values[0].dtype)
        attn = self.attn_dropout(probs, rngs=rngs)
        offsets = np.cumsum([0] + [v.shape[2] for v in values])
        out = sum(_weighted(attn[..., lo:hi], v) for v, lo, hi in zip(values, offsets[:-1], offsets[1:]))
        out = self.dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")), rngs=rngs)
        return (out, probs) if with_probs else out

    def fuses(self, with_probs: bool = False) -> bool:
        """Whether `attend` takes the fused path now: attention_impl="fused", no attention
        dropout in the current mode, and no probabilities asked for (compression="most_used"
        reads them at full segments). Otherwise the "xla" path runs, with the same values."""
        dropout_on = self.config.attn_dropout > 0 and not self.attn_dropout.deterministic
        return self.attention_impl == "fused" and not dropout_on and not with_probs

    def _fused_attend(
        self,
        q: Float[Array, "b h n dh"],
        keys: Sequence[Float[Array, "b h _ dh"]],
        values: Sequence[Float[Array, "b h _ dh"]],
        pos: Float[Array, "b h n k"],
        visible: Bool[Array, "#b 1 n k"],
        slot_valid: Bool[Array, "#b 1 1 k"],
        rngs: nnx.Rngs | None,
    ) -> Float[Array, "b n dim"]:
        """`attend`'s output through `jax.nn.dot_product_attention`: softmax(q.k * scale + bias) v
        with bias = the scaled position logits where visible, and the masks as large negative
        values (`_HIDDEN_BIAS`, `_INVALID_BIAS`: the same weights as the "xla" path)."""
        k = keys[0] if len(keys) == 1 else jnp.concatenate(keys, axis=2)  # [b, h, keys, dh]
        v = values[0] if len(values) == 1 else jnp.concatenate(values, axis=2)
        bias = jnp.where(slot_valid, jnp.where(visible, pos.astype(wide(self.dtype)), _HIDDEN_BIAS), _INVALID_BIAS)
        heads_last = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731  [b, h, n, dh] -> [b, n, h, dh]
        args = (heads_last(q), heads_last(k), heads_last(v))
        scale = self.config.dim_head**-0.5
        out = None
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:  # cuDNN's flash attention; it refuses some shapes (head dim, odd lengths) at trace time
                out = jax.nn.dot_product_attention(*args, bias=bias.astype(q.dtype), scale=scale,
                                                   implementation="cudnn")
            except (NotImplementedError, ValueError):
                out = None
        if out is None:
            out = jax.nn.dot_product_attention(*args, bias=bias, scale=scale)  # [b, n, h, dh]
        return self.dropout(self.to_out(rearrange(out, "b n h d -> b n (h d)")), rngs=rngs)

    def __call__(
        self,
        x: Float[Array, "b t d"],
        pos_emb: Float[Array, "h r dh"] | None,
        total_mem_valid: Int[Array, " b"],
        mask: Bool[Array, "b t"] | None = None,
        layer_memory: memlib.LayerMemory | None = None,
        rngs: nnx.Rngs | None = None,
        *,
        memory_gradients: bool = False,
    ) -> tuple[Float[Array, "b t d"], memlib.LayerMemory | None, Float[Array, ""]]:
        """Returns (output, updated layer memory or None, aux loss).

        `x` is the layer-normed input; `layer_memory` is this layer's buffers and counts
        (None for a layer without memory); `total_mem_valid` is each row's valid length of
        the memory layers' `cmem|mem`, which sets that row's learned positional rows in every
        layer (`pos_emb` is None under sinusoidal positions). Counts are per row: each row
        computes what it would alone. `memory_gradients`: the updated memory keeps its
        gradient (compression included).
        """
        config = self.config
        b, t, _ = x.shape
        x = x.astype(self.dtype)
        if layer_memory is None:
            mem = cmem = jnp.zeros((b, 0, x.shape[-1]), x.dtype)
            buffer_valid = jnp.zeros((b, 0), bool)
        else:
            mem, cmem = layer_memory.mem.astype(x.dtype), layer_memory.compressed_mem.astype(x.dtype)
            buffer_valid = layer_memory.slot_valid()
        n_cmem, n_mem = cmem.shape[1], mem.shape[1]
        n_buffer = n_cmem + n_mem

        q = self.queries(x)
        k, v = self.keys_values(jnp.concatenate([cmem, mem, x], axis=1))  # [b, h, c+m+t, dh] each
        updates = layer_memory is not None and t == config.seq_len
        with_probs = updates and config.compression == "most_used"  # the attention each slot received
        attended = self.attend(q, [k], [v], pos_emb=pos_emb, total_mem_valid=total_mem_valid,
                               buffer_valid=buffer_valid, mask=mask, rngs=rngs, with_probs=with_probs)
        out, probs = attended if with_probs else (attended, None)

        if not updates:
            return out, layer_memory, jnp.zeros((), wide(self.dtype))
        read = None
        if with_probs:
            read = compression.attention_received(probs[..., n_cmem:n_buffer].astype(jnp.float32), mask)
        new_memory, aux_loss = self.update_memory(
            layer_memory._replace(mem=mem, compressed_mem=cmem), x, q, k[:, :, n_cmem:n_buffer],
            v[:, :, n_cmem:n_buffer], read, rngs, memory_gradients=memory_gradients,
        )
        return out, new_memory, aux_loss

    def update_memory(
        self,
        layer_memory: memlib.LayerMemory,
        x: Float[Array, "b t d"],
        q: Float[Array, "b h t dh"],
        mem_k: Float[Array, "b h m dh"],
        mem_v: Float[Array, "b h m dh"],
        read: Float[Array, "b m"] | None,
        rngs: nnx.Rngs | None,
        *,
        memory_gradients: bool = False,
    ) -> tuple[memlib.LayerMemory, Float[Array, ""]]:
        """The memory after a full segment `x` (FIFO of mem_len, evicted slots compressed into
        cmem) and the aux loss. `q`, `mem_k`, `mem_v`: the segment's queries and the memory's
        keys/values; `read`: the attention each memory slot received now (most_used only)."""
        config = self.config
        mem, cmem = layer_memory.mem, layer_memory.compressed_mem
        mem_valid, cmem_valid = layer_memory.mem_valid, layer_memory.compressed_mem_valid
        t, n_mem, n_cmem = x.shape[1], mem.shape[1], cmem.shape[1]
        aux_loss = jnp.zeros((), wide(self.dtype))
        sg = jax.lax.stop_gradient

        new_mem_valid = jnp.minimum(mem_valid + t, config.mem_len)
        new_mem = jnp.concatenate([mem, x], axis=1)[:, t:]
        new_mem = jnp.where(memlib.valid_slots(n_mem, new_mem_valid)[:, :, None], new_mem, 0)
        usage = new_usage = None
        if read is not None:
            usage = layer_memory.mem_usage + read  # (b, m); invalid slots read 0
            new_usage = jnp.concatenate([usage, jnp.zeros_like(usage[:, :t])], axis=1)[:, t:]
        new_memory = memlib.LayerMemory(new_mem, cmem, new_mem_valid, cmem_valid, new_usage)
        if config.cmem_len == 0:
            return new_memory, aux_loss

        windows, evicted_count, n_compressed = memlib.evicted_windows(
            mem, mem_valid, x, config.mem_len, config.cmem_ratio, config.eviction_padding
        )
        if config.compression == "most_used":
            # The evicted region is the first t slots of mem|x = of mem (t <= mem_len).
            reads = compression.reads_per_slot(config.mem_len, config.seq_len)[:t]
            scores = usage[:, :t] / jnp.asarray(reads, usage.dtype)
            region_valid = memlib.valid_slots(t, evicted_count)  # (b, t)
            n_out = windows.shape[1]
            compress = lambda region: compression.select_most_used(  # noqa: E731
                region[:, :t], scores, region_valid, n_compressed, n_out
            )
            source = mem
        else:
            compress, source = self.compress_mem_fn, windows
        # The compressor reads stop-gradient memories unless memory gradients are on.
        compressed = compress(source if memory_gradients else sg(source))  # (b, n_out, d)
        new_cmem = memlib.right_aligned_concat(cmem, cmem_valid, compressed, n_compressed, n_cmem)
        new_cmem_valid = jnp.minimum(cmem_valid + n_compressed, config.cmem_len)
        new_memory = new_memory._replace(
            compressed_mem=new_cmem if memory_gradients else sg(new_cmem), compressed_mem_valid=new_cmem_valid
        )
        if self.deterministic or config.aux_loss == "none":
            return new_memory, aux_loss

        # The aux loss trains the compressor only: it reads stop-gradient memories.
        aux_compressed = compress(sg(source)) if memory_gradients else compressed
        window_valid = memlib.valid_slots(compressed.shape[1], n_compressed)
        if config.aux_loss == "autoencoder":
            # Decode the compressed slots back to the windows they were made from.
            decoded = self.decompress_mem_fn(aux_compressed).astype(aux_loss.dtype)  # (b, n, r, d)
            error = jnp.square(decoded - sg(windows).astype(aux_loss.dtype))
            error = jnp.where(window_valid[:, :, None, None], error, 0.0)
            # per row (a row alone gives its own), 0 for rows that compressed nothing; the batch's is their mean
            per_row = jnp.sum(error, axis=(1, 2, 3)) / (jnp.maximum(n_compressed, 1) * config.cmem_ratio * x.shape[-1])
            return new_memory, jnp.mean(jnp.where(n_compressed > 0, per_row, 0.0))

        # Attention reconstruction: the (frozen) queries over the target memories vs over the
        # new compressed slots, whose K/V use a stop-gradient copy of to_kv (upstream's
        # in-place detach_ froze to_kv; fixed). Target: the whole memory held (upstream) or
        # the evicted slots only (reconstruction_target="evicted", the paper's).
        target_valid = memlib.valid_slots(n_mem, mem_valid)
        if config.reconstruction_target == "evicted":
            target_valid = target_valid & (jnp.arange(n_mem)[None, :] < (n_mem - mem_valid + evicted_count)[:, None])
        comp_kv = aux_compressed @ sg(self.to_kv.kernel[...]).astype(aux_compressed.dtype)  # (b, n, 2 dim)
        comp_k, comp_v = map(self._heads, jnp.split(comp_kv, 2, axis=-1))
        q_sg = sg(q)
        target = self.full_attention(q_sg, sg(mem_k), sg(mem_v), target_valid, rngs)
        recon = self.full_attention(q_sg, comp_k, comp_v, window_valid, rngs)
        # per row (a row alone gives its own), 0 for rows that compressed nothing; the batch's is their mean
        mse = jnp.mean(jnp.square(target.astype(aux_loss.dtype) - recon.astype(aux_loss.dtype)), axis=(1, 2, 3))
        return new_memory, jnp.mean(jnp.where(n_compressed > 0, mse, 0.0))

    def full_attention(
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
