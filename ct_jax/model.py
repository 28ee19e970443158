"""The Compressive Transformer (one segment), Flax NNX; parameter paths mirror upstream's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, no_type_check

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ct_jax._checks import check_choice
from ct_jax.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax
from ct_jax.attention import ATTENTION_IMPLS, LayerCache, SelfAttention
from ct_jax.config import ModelConfig
from ct_jax.layers import FeedForward, GRUGate, Mogrifier, layer_norm, linear, wide
from ct_jax.memory import LayerMemory, Memory
from ct_jax.validation import check_mask, check_memory, check_tokens


class LayersOutput(NamedTuple):
    """What `CompressiveTransformer.run_layers` returns."""

    x: Float[Array, "r n d"]  # the stream after the last layer
    memories: tuple[LayerMemory, ...]  # each memory layer's memory after this segment (none with a cache)
    aux_loss: Float[Array, ""]  # summed over the layers, unweighted
    cache: tuple[LayerCache, ...] | None  # the updated caches, if given
    attention_mass: Float[Array, "l 3"] | None = None  # per layer, if asked (`AttentionOutput.mass`)


class Sublayer(nnx.Module):
    """PreNorm(fn) joined to the stream by a GRU gate (optionally mogrified) or a residual add."""

    def __init__(self, dim: int, fn: nnx.Module, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.norm = layer_norm(dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fn = fn
        gated = config.gru_gated_residual
        self.gru = GRUGate(dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype) if gated else None
        mogrify = gated and config.mogrify_gru
        self.mogrify = Mogrifier(dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype) if mogrify else None
        self.dtype = dtype

    def normed(self, x: jax.Array) -> jax.Array:
        return self.norm(x).astype(self.dtype)

    def join(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """Combines the sublayer output `y` with the stream `x`."""
        if self.gru is None:
            return y + x
        if self.mogrify is not None:
            y, x = self.mogrify(y, x)
        return self.gru(y, x)


class CompressiveTransformer(nnx.Module):
    """Compressive Transformer over one segment; same keywords and defaults as upstream 0.4.0.

    `dtype` is the compute dtype (e.g. bfloat16) and `param_dtype` the storage dtype;
    norms, softmax, logits and the aux loss stay in (at least) float32.
    `attention_impl` ("xla" or "fused", `ct_jax.attention.ATTENTION_IMPLS`) picks how the
    attention core runs, with equal values: "fused" uses `jax.nn.dot_product_attention`
    (cuDNN on a GPU) wherever it can (see `SelfAttention.fuses`). Like the dtypes it is a
    JAX-side choice, not a constructor keyword of upstream's: it is not in `config`.
    """

    def __init__(self, num_tokens: int, dim: int, seq_len: int, depth: int, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, attention_impl: str = "xla",
                 **kwargs: Any):
        config = ModelConfig.from_kwargs(dict(num_tokens=num_tokens, dim=dim, seq_len=seq_len, depth=depth, **kwargs))
        attention_impl = check_choice("attention_impl", attention_impl, ATTENTION_IMPLS)
        self.config = config
        self.dtype = dtype
        self.attention_impl = attention_impl
        emb_dim = config.emb_dim
        opts = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if config.adaptive:  # adaptive input and softmax at emb_dim, as ct_torch_ref (docs/paper-options.md)
            adaptive = (config.adaptive_cutoffs, config.adaptive_div_val)
            self.token_emb = AdaptiveEmbedding(num_tokens, emb_dim, *adaptive, **opts)
        else:
            self.token_emb = nnx.Embed(num_tokens, emb_dim, embedding_init=jax.nn.initializers.normal(1.0),
                                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_model_dim = linear(emb_dim, dim, **opts) if emb_dim != dim else None
        # zero-initialised as upstream; sinusoidal positions live in each attention layer instead
        self.pos_emb = (
            nnx.Param(jnp.zeros((config.heads, config.pos_len, config.dim_head), param_dtype))
            if config.relative_positions == "learned" else None
        )
        self.to_emb_dim = linear(dim, emb_dim, **opts) if emb_dim != dim else None  # upstream to_logits.0
        if config.adaptive:  # upstream to_logits.1, ct_torch_ref's AdaptiveLogSoftmax there
            self.to_logits = AdaptiveLogSoftmax(emb_dim, num_tokens, *adaptive, **opts)
        else:
            self.to_logits = linear(emb_dim, num_tokens, **opts)  # upstream to_logits.1
        self.attn_layers = nnx.List([
            Sublayer(dim, SelfAttention(config, attention_impl=attention_impl, **opts), config, **opts)
            for _ in range(depth)
        ])
        self.ff_layers = nnx.List([
            Sublayer(dim, FeedForward(dim, dropout=config.ff_dropout, glu=config.ff_glu, **opts), config, **opts)
            for _ in range(depth)
        ])

    def embed(self, tokens: Int[Array, "*lead"]) -> Float[Array, "*lead d"]:
        """Token ids to the model's stream (embedding, then the projection to `dim` if any)."""
        x = self.token_emb(tokens)
        return x if self.to_model_dim is None else self.to_model_dim(x)

    def logits(self, x: Float[Array, "*lead d"]) -> Float[Array, "*lead v"]:
        """The stream to next-token logits, in (at least) float32; an adaptive model's are its
        log-probabilities (their softmax is the adaptive distribution)."""
        with jax.named_scope("logits"):
            return self.to_logits(self.output_features(x)).astype(wide(self.dtype))

    def output_features(self, x: Float[Array, "*lead d"]) -> Float[Array, "*lead e"]:
        """The stream as the output layer reads it: projected to `emb_dim` if that differs (upstream to_logits.0)."""
        return x if self.to_emb_dim is None else self.to_emb_dim(x)

    def adaptive_nll(self, x: Float[Array, "b t d"], targets: Int[Array, "b t"], ignore_index: int
                     ) -> Float[Array, "b t"]:
        """-log p(target) per position from the stream `x`, 0 where targets == ignore_index, for an adaptive
        model: its softmax's `nll`, which never builds the (b, t, num_tokens) log-probabilities."""
        if not self.config.adaptive:
            raise ValueError("adaptive_nll is the adaptive softmax's loss; a full-softmax model's is "
                             "ct_jax.autoregressive.token_nll of its logits (adaptive_cutoffs is None here)")
        return self.to_logits.nll(self.output_features(x), targets, ignore_index)

    @no_type_check  # checks its own inputs (`ct_jax.validation`), with errors that name the argument
    def __call__(
        self,
        tokens: Int[ArrayLike, "b t"],
        memories: Memory | None = None,
        mask: Bool[ArrayLike, "b t"] | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        memory_gradients: bool = False,
    ) -> tuple[Float[Array, "b t v"], Memory, Float[Array, ""]]:
        """One segment: (logits, next memories, aux loss). `mask` True = real token.

        `rngs` (a `dropout` stream) overrides the model's own for dropout in training.
        `memory_gradients`: the next memories keep their gradient (compression included)
        instead of being stop-gradient (the paper's BPTT through memory). An adaptive model's
        logits are its log-probabilities (see `logits`); `features` stops before them.
        """
        x, next_memories, aux_loss = self.features(tokens, memories, mask, rngs=rngs,
                                                   memory_gradients=memory_gradients)
        return self.logits(x), next_memories, aux_loss

    @no_type_check  # checks its own inputs (`ct_jax.validation`), with errors that name the argument
    def features(
        self,
        tokens: Int[ArrayLike, "b t"],
        memories: Memory | None = None,
        mask: Bool[ArrayLike, "b t"] | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        memory_gradients: bool = False,
        attention_mass: bool = False,
    ) -> tuple[Float[Array, "b t d"], Memory, Float[Array, ""]]:
        """One segment up to the output layer: (the last layer's stream, next memories, aux loss), as
        ct_torch_ref's `features`; the LM loss reads it (`logits` or, adaptive, `adaptive_nll`).

        `attention_mass`: each layer's attention mass on compressed memory, memory and the segment,
        summed over the real queries ((depth, 3), see `ct_jax.attention.attention_mass`), is sown as
        the `nnx.Intermediate` `attention_mass` (`nnx.capture(model.features, nnx.Intermediate)` returns it).
        """
        config = self.config
        check_tokens(tokens, config)
        b, t = tokens.shape
        check_mask(mask, (b, t))
        check_memory(memories, config, b)
        if memories is None:
            memories = Memory.empty(self, b, self.dtype)
        x = self.embed(tokens)

        if config.enhanced_recurrence:  # each memory layer reads the memory of the one above it
            memories = memories._replace(**{
                name: jnp.roll(getattr(memories, name), -1, axis=0)
                for name in ("mem", "compressed_mem", "mem_usage") if getattr(memories, name) is not None
            })
        ran = self.run_layers(x, memories, mask, rngs=rngs, memory_gradients=memory_gradients,
                              attention_mass=attention_mass)
        if attention_mass:
            self.sow(nnx.Intermediate, "attention_mass", ran.attention_mass)
        last = ran.memories[-1]
        mem = jnp.stack([layer.mem for layer in ran.memories])
        cmem = jnp.stack([layer.compressed_mem for layer in ran.memories])
        if not memory_gradients:
            mem, cmem = jax.lax.stop_gradient(mem), jax.lax.stop_gradient(cmem)
        usage = None if last.mem_usage is None else jnp.stack([layer.mem_usage for layer in ran.memories])
        next_memories = Memory(mem, cmem, last.mem_valid, last.compressed_mem_valid, usage)
        aux_loss = ran.aux_loss * config.reconstruction_loss_weight / len(config.memory_layers)
        return ran.x, next_memories, aux_loss

    def run_layers(
        self,
        x: Float[Array, "b n d"],
        memories: Memory | None,
        mask: Bool[Array, "b s"] | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        memory_gradients: bool = False,
        cache: Sequence[LayerCache] | None = None,
        attention_mass: bool = False,
    ) -> LayersOutput:
        """The layer stack on the stream `x`: the one path of the segment forward and the decoder.

        Without `cache`: `x` is a segment, `memories` the (already rolled) memory, and memory
        layers update theirs at a full segment. With `cache` (`ct_jax.generation`): `memories`
        is None, each layer reads its keys/values and counts from its `LayerCache` and returns it
        updated, and `mask` covers the window. A cache holding more rows than `x` holds the
        decoder's variants of each row: from that layer up, `x` runs once per variant.
        `attention_mass` (segments only): the output carries each layer's `AttentionOutput.mass`.
        """
        if attention_mass and cache is not None:
            raise ValueError("attention_mass is measured on segments, not with a decoder cache")
        pos_emb = self.pos_emb[...] if self.pos_emb is not None else None
        total_valid = None if memories is None else memories.total_valid
        next_memories, next_cache, masses = [], [], []
        aux_loss = jnp.zeros((), wide(self.dtype))
        for index, (attn, ff) in enumerate(zip(self.attn_layers, self.ff_layers)):
            is_memory_layer = memories is not None and index + 1 in self.config.memory_layers
            layer_memory = memories.layer(len(next_memories)) if is_memory_layer else None
            layer_cache = None if cache is None else cache[index]
            if layer_cache is not None:
                x, mask = _variant_rows(x, mask, layer_cache.k.shape[0])
                total_valid = layer_cache.total_valid
            with jax.named_scope("attention"):  # scopes name the ops of a profile (ct_jax.bench.decode_profile)
                result = attn.fn(attn.normed(x), pos_emb, total_valid, mask, layer_memory, rngs,
                                 memory_gradients=memory_gradients, cache=layer_cache, mass=attention_mass)
                x = attn.join(result.out, x)
            with jax.named_scope("feed_forward"):
                x = ff.join(ff.fn(ff.normed(x), rngs), x)
            aux_loss = aux_loss + result.aux_loss
            if result.memory is not None:
                next_memories.append(result.memory)
            next_cache.append(result.cache)
            masses.append(result.mass)
        return LayersOutput(x, tuple(next_memories), aux_loss, None if cache is None else tuple(next_cache),
                            jnp.stack(masses) if attention_mass else None)


def _variant_rows(
    x: Float[Array, "b n d"], mask: Bool[Array, "b s"] | None, rows: int
) -> tuple[Float[Array, "r n d"], Bool[Array, "r s"] | None]:
    """`x` and `mask` repeated variant-major to `rows` rows (see `ct_jax.generation`: the cache
    holds every variant of each row from the first memory layer up)."""
    if rows == x.shape[0]:
        return x, mask
    times = rows // x.shape[0]
    return jnp.concatenate([x] * times), None if mask is None else jnp.concatenate([mask] * times)
