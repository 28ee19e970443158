"""Self-attention over `cmem | mem | x` with relative positions, memory update and aux loss
(upstream's, and the paper-faithful options of docs/paper-options.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax import compression
from ct_jax import memory as memlib
from ct_jax.config import ModelConfig
from ct_jax.layers import linear, wide
from ct_jax.memory import LayerMemory
from ct_jax.positions import sinusoid_table


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
    """Upstream's `SelfAttention`, on fixed-shape memory buffers, with the paper's options."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        dim = config.dim
        self.config = config
        self.dtype = dtype
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

    def _heads(self, x: jax.Array) -> jax.Array:
        return rearrange(x, "b n (h d) -> b h n d", h=self.config.heads)

    def _logits(
        self, q: Float[Array, "b h t dh"], k: Float[Array, "b h k dh"], pos_emb, total_mem_valid, n_buffer: int
    ) -> Float[Array, "b h t k"]:
        """Scaled content + relative-position logits of the t queries against `cmem|mem|x`."""
        config = self.config
        scale = config.dim_head**-0.5
        t, keys = q.shape[2], k.shape[2]
        if config.relative_positions == "sinusoidal":
            # Window row j encodes distance n_buffer + t - 1 - j, the layout relative_shift
            # reads: rows seq_len - t .. of the table of distances n_buffer + seq_len - 1 .. 0.
            table = sinusoid_table(n_buffer + config.seq_len, config.dim)[config.seq_len - t:]
            pos_keys = self._heads(self.to_pos(jnp.asarray(table, self.dtype))[None])[0]  # (h, keys, dh)
            content_q = q + self.pos_bias_u[...].astype(q.dtype)[None, :, None, :]
            position_q = q + self.pos_bias_v[...].astype(q.dtype)[None, :, None, :]
            dots = jnp.einsum("bhid,bhjd->bhij", content_q, k) * scale  # (b, h, t, keys)
            pos_dots = jnp.einsum("bhid,hjd->bhij", position_q, pos_keys) * scale  # (b, h, t, keys)
            return (dots + relative_shift(pos_dots, keys)).astype(wide(self.dtype))
        dots = jnp.einsum("bhid,bhjd->bhij", q, k) * scale  # (b, h, t, keys)
        # Key p, query a are d = n_buffer + a - p apart; upstream reads position row
        # total_mem_valid + seq_len - 1 - d, so the rows drift while memory fills (kept).
        # Visible pairs (p <= n_buffer + a) read window rows p + t - 1 - a <= keys - 1, so
        # `keys` rows suffice (not keys + t - 1): future pairs read wrapped values, which the
        # causal mask overwrites. A third less q.P work and a smaller skew.
        first_row = total_mem_valid + config.seq_len - 1 - n_buffer - (t - 1)
        window = position_window(pos_emb.astype(q.dtype), first_row, keys)
        pos_dots = jnp.einsum("bhid,hjd->bhij", q, window) * scale  # (b, h, t, keys)
        return (dots + relative_shift(pos_dots, keys)).astype(wide(self.dtype))

    def __call__(
        self,
        x: Float[Array, "b t d"],
        pos_emb: Float[Array, "h r dh"] | None,
        total_mem_valid: Int[Array, ""],
        mask: Bool[Array, "b t"] | None = None,
        layer_memory: LayerMemory | None = None,
        rngs: nnx.Rngs | None = None,
        *,
        memory_gradients: bool = False,
    ) -> tuple[jax.Array, LayerMemory | None, jax.Array]:
        """Returns (output, updated layer memory or None, aux loss).

        `x` is the layer-normed input; `layer_memory` is this layer's buffers and counts
        (None for a layer without memory); `total_mem_valid` is the valid length of the
        memory layers' `cmem|mem`, which sets the learned positional rows for every layer.
        `memory_gradients`: the updated memory keeps its gradient (compression included).
        """
        config = self.config
        b, t, _ = x.shape
        x = x.astype(self.dtype)
        if layer_memory is None:
            mem = cmem = jnp.zeros((b, 0, x.shape[-1]), x.dtype)
            mem_valid = cmem_valid = jnp.zeros((), jnp.int32)
        else:
            mem, cmem = layer_memory.mem.astype(x.dtype), layer_memory.compressed_mem.astype(x.dtype)
            mem_valid, cmem_valid = layer_memory.mem_valid, layer_memory.compressed_mem_valid
        n_cmem, n_mem = cmem.shape[1], mem.shape[1]
        n_buffer = n_cmem + n_mem
        keys = n_buffer + t

        q = self._heads(self.to_q(x))
        kv_input = jnp.concatenate([cmem, mem, x], axis=1)
        k, v = jnp.split(self.to_kv(kv_input), 2, axis=-1)
        k, v = self._heads(k), self._heads(v)
        dots = self._logits(q, k, pos_emb, total_mem_valid, n_buffer)

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
        probs = masked_softmax(dots, slot_valid[None, None, None, :]).astype(v.dtype)
        attn = self.attn_dropout(probs, rngs=rngs)
        out = rearrange(jnp.einsum("bhij,bhjd->bhid", attn, v), "b h t d -> b t (h d)")
        out = self.dropout(self.to_out(out), rngs=rngs)

        if layer_memory is None or t != config.seq_len:
            return out, layer_memory, jnp.zeros((), wide(self.dtype))
        read = None
        if config.compression == "most_used":
            read = compression.attention_received(probs[..., n_cmem:n_buffer].astype(jnp.float32), mask)
        new_memory, aux_loss = self.update_memory(
            layer_memory._replace(mem=mem, compressed_mem=cmem), x, q, k[:, :, n_cmem:n_buffer],
            v[:, :, n_cmem:n_buffer], read, rngs, memory_gradients=memory_gradients,
        )
        return out, new_memory, aux_loss

    def update_memory(
        self,
        layer_memory: LayerMemory,
        x: Float[Array, "b t d"],
        q: Float[Array, "b h t dh"],
        mem_k: Float[Array, "b h m dh"],
        mem_v: Float[Array, "b h m dh"],
        read: Float[Array, "b m"] | None,
        rngs: nnx.Rngs | None,
        *,
        memory_gradients: bool = False,
    ) -> tuple[LayerMemory, Float[Array, ""]]:
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
        new_mem = jnp.where(memlib.valid_slots(n_mem, new_mem_valid)[None, :, None], new_mem, 0)
        usage = new_usage = None
        if read is not None:
            usage = layer_memory.mem_usage + read  # (b, m); invalid slots read 0
            new_usage = jnp.concatenate([usage, jnp.zeros_like(usage[:, :t])], axis=1)[:, t:]
        new_memory = LayerMemory(new_mem, cmem, new_mem_valid, cmem_valid, new_usage)
        if config.cmem_len == 0:
            return new_memory, aux_loss

        windows, evicted_count, n_compressed = memlib.evicted_windows(
            mem, mem_valid, x, config.mem_len, config.cmem_ratio, config.eviction_padding
        )
        if config.compression == "most_used":
            # The evicted region is the first t slots of mem|x = of mem (t <= mem_len).
            reads = compression.reads_per_slot(config.mem_len, config.seq_len)[:t]
            scores = usage[:, :t] / jnp.asarray(reads, usage.dtype)
            region_valid = memlib.valid_slots(t, evicted_count)[None, :]
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
            error = jnp.where(window_valid[None, :, None, None], error, 0.0)
            count = jnp.maximum(n_compressed, 1) * x.shape[0] * config.cmem_ratio * x.shape[-1]
            return new_memory, jnp.where(n_compressed > 0, jnp.sum(error) / count, 0.0)

        # Attention reconstruction: the (frozen) queries over the target memories vs over the
        # new compressed slots, whose K/V use a stop-gradient copy of to_kv (upstream's
        # in-place detach_ froze to_kv; fixed). Target: the whole memory held (upstream) or
        # the evicted slots only (reconstruction_target="evicted", the paper's).
        target_valid = memlib.valid_slots(n_mem, mem_valid)
        if config.reconstruction_target == "evicted":
            target_valid = target_valid & (jnp.arange(n_mem) < n_mem - mem_valid + evicted_count)
        comp_kv = aux_compressed @ sg(self.to_kv.kernel[...]).astype(aux_compressed.dtype)  # (b, n, 2 dim)
        comp_k, comp_v = map(self._heads, jnp.split(comp_kv, 2, axis=-1))
        q_sg = sg(q)
        target = self._full_attention(q_sg, sg(mem_k), sg(mem_v), target_valid, rngs)
        recon = self._full_attention(q_sg, comp_k, comp_v, window_valid, rngs)
        mse = jnp.mean(jnp.square(target.astype(aux_loss.dtype) - recon.astype(aux_loss.dtype)))
        return new_memory, jnp.where(n_compressed > 0, mse, 0.0)

    def _full_attention(self, q, k, v, valid, rngs) -> jax.Array:
        """Unmasked attention over the valid slots, as upstream's `full_attn`."""
        dots = jnp.einsum("bhid,bhjd->bhij", q, k) * self.config.dim_head**-0.5  # (b, h, t, j)
        attn = masked_softmax(dots, valid[None, None, None, :]).astype(v.dtype)
        attn = self.reconstruction_attn_dropout(attn, rngs=rngs)
        return jnp.einsum("bhij,bhjd->bhid", attn, v)  # (b, h, t, dh)
