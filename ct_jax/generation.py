"""Sampling from a CompressiveTransformer: one compiled `lax` loop with cached keys/values.

Windows and memory are those of `ct_torch_ref.AutoregressiveWrapper.generate` (upstream's,
with its defects fixed): the prime is cut into `seq_len` windows from the left; all but the
last only update the memory (a prime of exactly k * seq_len tokens keeps its last full
window as the current one). The current window then grows by one sampled token per model
call; the memory changes only when a call sees a full window, after which the window
restarts at the token sampled from it.

The cache. The reference re-runs the model on the whole window at every call. Feed-forward,
gates and norms act per position, attention is causal and the positional rows depend only
on the valid memory length, which is fixed within a window, so a token's state depends only
on the tokens before it and the memory. Each layer keeps the keys and values of the
window's tokens in `seq_len` slots (and those of its `cmem | mem`, computed once per
window), so a new token costs one attention row over memory + window. Three upstream
details shape this, each checked by tests/test_generation.py:

- Enhanced recurrence also rolls the memory on calls with a short window and the reference
  returns that rolled memory, so its k-th call in a window reads the memory rolled k times:
  every earlier token is recomputed under a new memory-to-layer assignment. The assignment
  cycles with period `len(memory_layers)`, so the cache holds every token under every
  assignment ("variants", stacked on the batch axis) and a call reads the one it is at.
  Without enhanced recurrence, or with one memory layer, there is one variant.
- A padded query that sees nothing (a masked prime token in a layer without valid memory)
  attends uniformly to the whole window, later tokens included: its state is not causal.
  Real tokens never read it, but a padded token can be the last of the prime, so the first
  call runs the prime's part of the window at once, as the reference does.
- The memory stores those states too, so a call on a full window is the model's own forward
  on the window (its logits and its memory update: the training code path), once per
  `seq_len` tokens, which keeps the cost per token at one window's worth of attention.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, no_type_check

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ct_jax.attention import SelfAttention
from ct_jax.layers import wide
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer
from ct_jax.sampling import FILTERS, FilterFn, draw, top_k, top_p  # noqa: F401  (top_k, top_p: public here too)


class Decoded(NamedTuple):
    """What `decode` returns. Rows are padded with `eos_token` after their first eos."""

    tokens: Int[Array, "*b n"]  # n = the requested length (no b for a 1-D prime)
    lengths: Int[Array, "*b"]  # tokens up to and including each row's first eos (else n)
    logits: Float[Array, "*b n v"] | None  # the logits each token was drawn from, if asked


class _State(NamedTuple):
    """The decoding loop's carry. Stream indices: prime (p tokens), then generated ones."""

    memory: Memory  # as the last full window left it (not rolled)
    memory_kv: tuple[tuple[jax.Array, jax.Array], ...]  # per memory layer: K, V of cmem|mem, (V*b, h, c+m, dh)
    cache_kv: tuple[tuple[jax.Array, jax.Array], ...]  # per layer: K, V of the window, (V*b or b, h, seq_len, dh)
    stream: Int[Array, "b n"]  # prime | generated tokens (| padding)
    pos: Int[Array, ""]  # the token to run next (the window's last)
    start: Int[Array, ""]  # where the current window starts
    call: Int[Array, ""]  # 1-based count of reference calls since the memory last changed
    tokens: Int[Array, "b l"]  # generated tokens, eos-padded
    logits: Float[Array, "b l v"] | None
    done: Bool[Array, " b"]
    lengths: Int[Array, " b"]


def _n_variants(config) -> int:
    return len(config.memory_layers) if config.enhanced_recurrence else 1


def _rolled(memory: Memory, shift) -> Memory:
    """The memory as the reference passes it after `shift` rolls by -1 over the layer axis."""
    layers = memory.mem.shape[0]
    order = (jnp.arange(layers) + shift) % layers
    usage = None if memory.mem_usage is None else jnp.take(memory.mem_usage, order, axis=0)
    return memory._replace(mem=jnp.take(memory.mem, order, axis=0),
                           compressed_mem=jnp.take(memory.compressed_mem, order, axis=0), mem_usage=usage)


def _memory_kv(net: CompressiveTransformer, memory: Memory) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """K, V of each memory layer's `cmem | mem`, for every variant v (the memory rolled v times)."""
    config = net.config
    layers, n_variants = len(config.memory_layers), _n_variants(config)
    out = []
    for slot, layer in enumerate(config.memory_layers):
        sources = [(slot + v) % layers for v in range(n_variants)]  # variant-major on the batch axis
        mem = jnp.concatenate([memory.mem[source] for source in sources])
        cmem = jnp.concatenate([memory.compressed_mem[source] for source in sources])
        out.append(net.attn_layers[layer - 1].fn.keys_values(jnp.concatenate([cmem, mem], axis=1)))
    return tuple(out)


def _attend_cached(
    fn: SelfAttention,
    x: Float[Array, "b n d"],
    *,
    pos_emb: Float[Array, "h r dh"] | None,
    total_valid: Int[Array, ""],
    start: Int[Array, ""] | int,
    end: Int[Array, ""],
    mask: Bool[Array, "b s"],
    memory_kv: tuple[Float[Array, "b h k dh"], Float[Array, "b h k dh"]] | None,
    buffer_valid: Bool[Array, " k"],
    cache: tuple[Float[Array, "b h s dh"], Float[Array, "b h s dh"]],
) -> tuple[Float[Array, "b n d"], tuple[Float[Array, "b h s dh"], Float[Array, "b h s dh"]]]:
    """`SelfAttention.__call__`'s values for window positions [start, start + n), from the cache.

    `x` is the layer-normed input of those positions; their K/V are written into the
    cache. The window holds `end` tokens: later slots get zero weight. Memory and window
    keys stay apart (no per-token concatenation of the caches).
    """
    q = fn.queries(x)
    k_new, v_new = fn.keys_values(x)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k_new.astype(cache[0].dtype), start, axis=2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v_new.astype(cache[1].dtype), start, axis=2)
    blocks = [(k_cache, v_cache)] if memory_kv is None else [memory_kv, (k_cache, v_cache)]
    out = fn.attend(
        q, [k for k, _ in blocks], [v for _, v in blocks], pos_emb=pos_emb, total_mem_valid=total_valid,
        buffer_valid=buffer_valid if memory_kv is not None else jnp.zeros((0,), bool), first_query=start,
        window_valid=jnp.arange(fn.config.seq_len) < end, mask=mask,
    )
    return out, (k_cache, v_cache)


def _run_cached(net: CompressiveTransformer, tokens: Int[Array, "b n"], window_mask: Bool[Array, "b s"],
                memory: Memory, memory_kv, cache_kv, start: Int[Array, ""] | int, end: Int[Array, ""]):
    """Runs `tokens`, window positions [start, start + n), through every layer for every variant,
    in a window of `end` tokens.

    Returns the final hidden state at position end - 1, (V, b, d), and the updated caches.
    """
    config = net.config
    n_variants = _n_variants(config)
    x = net.embed(tokens)
    mask = window_mask
    # Every row of a generation is advanced by the same windows, so all rows hold equal memory: row 0's
    # counts serve every row (and every variant stacked on the batch axis).
    buffer_valid, total_valid = memory.slot_valid()[0], memory.total_valid[0]
    pos_emb = net.pos_emb[...] if net.pos_emb is not None else None
    caches = []
    for index, (attn, ff) in enumerate(zip(net.attn_layers, net.ff_layers)):
        layer = index + 1
        if layer == min(config.memory_layers):  # layers below the first memory layer do not vary
            x = jnp.concatenate([x] * n_variants)  # (V*b, n, d), variant-major
            mask = jnp.concatenate([window_mask] * n_variants)
        layer_kv = memory_kv[config.memory_layers.index(layer)] if layer in config.memory_layers else None
        y, cache = _attend_cached(attn.fn, attn.normed(x), pos_emb=pos_emb, total_valid=total_valid,
                                  start=start, end=end, mask=mask, memory_kv=layer_kv, buffer_valid=buffer_valid,
                                  cache=cache_kv[index])
        caches.append(cache)
        x = attn.join(y, x)
        x = ff.join(ff.fn(ff.normed(x)), x)
    last = jax.lax.dynamic_index_in_dim(x, end - 1 - start, axis=1, keepdims=False)
    return last.reshape(n_variants, -1, x.shape[-1]), tuple(caches)


def _decode(graphdef, state, prime, prime_len, mask, rng, temperature, eos_token, *, length: int,
            filter_fn: FilterFn | None, filter_thres: float, return_logits: bool, on_token) -> Decoded:
    """The compiled loop. `prime` (b, capacity) holds `prime_len` (traced) tokens, then padding.

    One iteration is one call of the reference: a full window (the prime's leading ones,
    which sample nothing, and every later one) through the model's forward; the first
    sampling call through the cache with all of its window's prime tokens at once; every
    other call through the cache with its one new token. `mask` covers `prime`.
    """
    net = nnx.merge(graphdef, state)
    net.eval()
    config = net.config
    seq_len, n_variants = config.seq_len, _n_variants(config)
    batch = prime.shape[0]
    stream_len = prime.shape[1] + length + seq_len  # room for a whole window past the end
    stream = jnp.pad(prime.astype(jnp.int32), ((0, 0), (0, stream_len - prime.shape[1])))
    stream_mask = jnp.pad(mask, ((0, 0), (0, stream_len - prime.shape[1])), constant_values=True)
    has_eos = eos_token >= 0
    pad = jnp.where(has_eos, eos_token, 0)
    def cache_shape(layer: int) -> tuple[int, ...]:  # layers below the first memory layer: one variant
        rows = batch if layer < min(config.memory_layers) else n_variants * batch
        return (rows, config.heads, seq_len, config.dim_head)

    memory = Memory.empty(net, batch, net.dtype)
    init = _State(
        memory=memory, memory_kv=_memory_kv(net, memory),
        cache_kv=tuple((jnp.zeros(cache_shape(layer), net.dtype),) * 2 for layer in range(1, config.depth + 1)),
        stream=stream, pos=jnp.zeros((), jnp.int32), start=jnp.zeros((), jnp.int32), call=jnp.ones((), jnp.int32),
        tokens=jnp.broadcast_to(pad, (batch, length)).astype(jnp.int32),
        logits=jnp.zeros((batch, length, config.num_tokens), wide(net.dtype)) if return_logits else None,
        done=jnp.zeros((batch,), bool), lengths=jnp.full((batch,), length, jnp.int32),
    )

    def call(s: _State, incremental_only: bool) -> _State:
        """One reference call. `incremental_only`: the caller knows it is a one-token cached call."""
        pos = s.pos
        if not incremental_only:
            # At a window start: a window of prime tokens only is run whole, as the reference runs
            # the prime's full windows; the rest of the prime is the first call's window.
            at_start = s.pos == s.start
            pos = jnp.where(at_start, jnp.where(s.start + seq_len <= prime_len, s.start + seq_len - 1,
                                                jnp.maximum(s.pos, prime_len - 1)), s.pos)
        filled = pos - s.start + 1
        window = jax.lax.dynamic_slice_in_dim(s.stream, s.start, seq_len, axis=1)
        window_mask = jax.lax.dynamic_slice_in_dim(stream_mask, s.start, seq_len, axis=1)

        def full(s: _State):
            # The model's own forward; it rolls the memory once more, as the reference's call does.
            memory = _rolled(s.memory, s.call - 1) if n_variants > 1 else s.memory
            logits, memory, _ = net(window, memory, window_mask)
            return memory, _memory_kv(net, memory), s.cache_kv, logits[:, -1]

        def cached(tokens, start):
            last, cache_kv = _run_cached(net, tokens, window_mask, s.memory, s.memory_kv, s.cache_kv, start, filled)
            return s.memory, s.memory_kv, cache_kv, net.logits(last[s.call % n_variants])

        def first(s: _State):
            # All of the first call's window at once: a padded prime token attends to the
            # whole window (see the module docstring), and the first token may be one.
            return cached(window, 0)

        def incremental(s: _State):
            return cached(jax.lax.dynamic_slice_in_dim(s.stream, pos, 1, axis=1), pos - s.start)

        if incremental_only:
            is_full = jnp.zeros((), bool)
            memory, memory_kv, cache_kv, logits = incremental(s)
        else:
            is_full = filled == seq_len
            kind = jnp.where(is_full, 0, jnp.where(pos == prime_len - 1, 1, 2))
            memory, memory_kv, cache_kv, logits = jax.lax.switch(kind, (full, first, incremental), s)
        sampling = pos >= prime_len - 1  # else a prime window: the next token is the prime's
        index = jnp.maximum(pos - (prime_len - 1), 0)  # prime windows write index 0, overwritten later
        sample = draw(logits, jax.random.fold_in(rng, index), temperature, filter_fn, filter_thres)
        next_token = jnp.where(sampling, sample, jax.lax.dynamic_index_in_dim(s.stream, pos + 1, 1, keepdims=False))
        stream = jax.lax.dynamic_update_slice_in_dim(s.stream, next_token[:, None], pos + 1, axis=1)
        emitted = jnp.where(s.done, pad, sample)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, emitted[:, None], index, axis=1)
        logits_out = s.logits
        if logits_out is not None:
            logits_out = jax.lax.dynamic_update_slice_in_dim(logits_out, logits[:, None], index, axis=1)
        if on_token is not None:
            jax.debug.callback(functools.partial(_report, on_token), sampling, index, emitted, ordered=True)
        ends = sampling & has_eos & ~s.done & (sample == eos_token)
        return _State(
            memory=memory, memory_kv=memory_kv, cache_kv=cache_kv, stream=stream, pos=pos + 1,
            start=jnp.where(is_full, pos + 1, s.start),
            call=jnp.where(is_full, 1, jnp.where(sampling, s.call + 1, s.call)),
            tokens=tokens, logits=logits_out, done=s.done | ends, lengths=jnp.where(ends, index + 1, s.lengths),
        )

    def keep_going(s: _State):
        return (s.pos < prime_len - 1 + length) & ~jnp.all(s.done)

    def incremental_next(s: _State):
        # Inside a window, past the prime and short of full: the call is one cached token.
        return keep_going(s) & (s.pos > s.start) & (s.pos - s.start + 1 < seq_len) & (s.pos > prime_len - 1)

    def body(s: _State) -> _State:
        # Any call, then the window's run of one-token calls in a loop of their own: its body
        # has no branch, so the memory and its K/V pass through untouched (no per-token copies).
        s = call(s, incremental_only=False)
        return jax.lax.while_loop(incremental_next, functools.partial(call, incremental_only=True), s)

    final = jax.lax.while_loop(keep_going, body, init)
    return Decoded(final.tokens, final.lengths, final.logits)


def _report(on_token, sampling, index, tokens) -> None:
    if sampling:
        on_token(int(index), tokens)


_decode_jit = jax.jit(_decode, static_argnums=(0,),
                      static_argnames=("length", "filter_fn", "filter_thres", "return_logits", "on_token"))


def _prime_capacity(prime_len: int) -> int:
    """Prime buffer size: a power of two >= 64, so that most prime lengths share a compilation."""
    return max(64, 1 << (prime_len - 1).bit_length())


def with_dtype(model: CompressiveTransformer, dtype: Any) -> CompressiveTransformer:
    """`model` computing in, and holding its weights in, `dtype` (e.g. bfloat16: half the bytes
    a decoded token reads); the model itself if it already does. Norms, softmax and logits stay
    in (at least) float32 as in any compute dtype."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a floating dtype (e.g. jnp.bfloat16) or None, got {dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (e.g. jnp.bfloat16) or None, got {dtype}")
    params = nnx.state(model, nnx.Param)
    if dtype == model.dtype and all(x.dtype == dtype for x in jax.tree.leaves(params)):
        return model
    copy = nnx.eval_shape(lambda: CompressiveTransformer(
        **model.config.to_kwargs(), rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
        attention_impl=model.attention_impl))
    nnx.update(copy, jax.tree.map(lambda x: x.astype(dtype), params), nnx.state(model, nnx.Not(nnx.Param)))
    return copy


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


@no_type_check  # checks its own arguments, with errors that name them
def decode(
    model: CompressiveTransformer,
    prime: Int[ArrayLike, "*b p"],
    length: int,
    rng: jax.Array,
    temperature: float | jax.Array = 1.0,
    filter_logits_fn: str | FilterFn | None = "top_k",
    filter_thres: float = 0.9,
    eos_token: int | None = None,
    mask: Bool[ArrayLike, "*b p"] | None = None,
    *,
    return_logits: bool = False,
    on_token: Callable[[np.ndarray, np.ndarray], Any] | None = None,
    dtype: Any = None,
) -> Decoded:
    """`generate` with everything: tokens, lengths and (optionally) the logits of each draw.

    `on_token(index, tokens)` (a hashable callable) is called from inside the compiled
    loop (`jax.debug.callback`, ordered) with each step's (b,) tokens as they are made.
    `dtype`: decode with the weights, activations, memory and cache in this dtype (e.g.
    `jnp.bfloat16`; `with_dtype`); None = the model's own (float32: exact, the default).
    bfloat16's agreement with float32 is `ct_jax.parity.BF16_DECODE_LOGITS_ATOL`.
    """
    if dtype is not None:
        model = with_dtype(model, dtype)
    config = model.config
    prime = jnp.asarray(prime)
    if prime.ndim not in (1, 2) or not jnp.issubdtype(prime.dtype, jnp.integer):
        raise ValueError(f"prime must be a (b, p) or (p,) array of token ids, got {prime.dtype} {prime.shape}")
    one_d = prime.ndim == 1
    prime = prime[None] if one_d else prime
    if prime.shape[1] < 1:
        raise ValueError(f"prime must hold at least one token, got shape {prime.shape}")
    if _is_concrete(prime) and prime.size and not (0 <= int(prime.min()) and int(prime.max()) < config.num_tokens):
        raise ValueError(
            f"prime token ids must be in [0, {config.num_tokens}), got [{int(prime.min())}, {int(prime.max())}]"
        )
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length (tokens to generate) must be an int >= 0, got {length!r}")
    if _is_concrete(temperature) and float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if isinstance(filter_logits_fn, str):
        if filter_logits_fn not in FILTERS:
            raise ValueError(f"filter_logits_fn must be 'top_k', 'top_p', None or a callable, got {filter_logits_fn!r}")
        filter_logits_fn = FILTERS[filter_logits_fn]
    elif filter_logits_fn is not None and not callable(filter_logits_fn):
        raise ValueError(f"filter_logits_fn must be 'top_k', 'top_p', None or a callable, got {filter_logits_fn!r}")
    if not isinstance(filter_thres, (int, float)) or isinstance(filter_thres, bool) or not 0 <= filter_thres <= 1:
        raise ValueError(f"filter_thres must be a float in [0, 1], got {filter_thres!r}")
    if mask is None:  # all real: the same values as no mask, and the same compilation as a mask
        mask = jnp.ones(prime.shape, bool)
    mask = jnp.asarray(mask)
    mask = mask[None] if one_d and mask.ndim == 1 else mask
    if mask.shape != prime.shape or mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a bool array of the prime's shape {prime.shape}, got {mask.dtype} {mask.shape}")
    if eos_token is not None and (isinstance(eos_token, bool) or not isinstance(eos_token, (int, np.integer))
                                  or not 0 <= eos_token < config.num_tokens):
        raise ValueError(f"eos_token must be None or an int in [0, {config.num_tokens}), got {eos_token!r}")
    length = int(length)
    batch, prime_len = prime.shape
    if length == 0:
        out = Decoded(jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch,), jnp.int32),
                      jnp.zeros((batch, 0, config.num_tokens), jnp.float32) if return_logits else None)
    else:
        capacity = _prime_capacity(prime_len)
        padded = jnp.pad(prime.astype(jnp.int32), ((0, 0), (0, capacity - prime_len)))
        mask = jnp.pad(mask, ((0, 0), (0, capacity - prime_len)), constant_values=True)
        graphdef, state = nnx.split(model)
        out = _decode_jit(
            graphdef, state, padded, jnp.asarray(prime_len, jnp.int32), mask, rng,
            jnp.asarray(temperature, jnp.float32), jnp.asarray(-1 if eos_token is None else eos_token, jnp.int32),
            length=length, filter_fn=filter_logits_fn, filter_thres=float(filter_thres),
            return_logits=return_logits, on_token=on_token,
        )
    if one_d:
        out = Decoded(out.tokens[0], out.lengths[0], None if out.logits is None else out.logits[0])
    return out


@no_type_check  # checks its own arguments, with errors that name them
def generate(
    model: CompressiveTransformer,
    prime: Int[ArrayLike, "*b p"],
    length: int,
    rng: jax.Array,
    temperature: float | jax.Array = 1.0,
    filter_logits_fn: str | FilterFn | None = "top_k",
    filter_thres: float = 0.9,
    eos_token: int | None = None,
    mask: Bool[ArrayLike, "*b p"] | None = None,
    *,
    dtype: Any = None,
) -> Int[Array, "*b n"] | tuple[Int[Array, "*b n"], Int[Array, "*b"]]:
    """Samples `length` tokens after `prime` in one compiled call; same windows and memory as
    `ct_torch_ref`'s generate.

    prime: (b, p) or (p,) token ids, any p >= 1; a 1-D prime gives 1-D results.
    temperature: 0 = greedy (argmax; no filtering, no sampling). filter_logits_fn: "top_k",
    "top_p", None or a jax callable `(logits, thres=...) -> logits`; `filter_thres` has
    upstream's meaning (0.9 with top_k keeps the top 10%), and at least one token is kept.
    mask: (b, p) bool, True = real prime token (generated tokens are always real).
    Returns the (b, length) tokens. With `eos_token`, returns `(tokens, lengths)`: each row
    stops at its first eos (included; `lengths` counts up to it, else `length`), later
    slots hold `eos_token`, and the loop ends once every row has emitted one. (The
    reference instead stops only when every row draws eos at the same step; shapes here
    stay static: trim with `tokens[:, :lengths.max()]` outside `jit` for its shape.)
    dtype: decode in this dtype (e.g. jnp.bfloat16: weights and cache cast; see `decode`);
    None = the model's own.
    The first call per (model structure, shapes, length, filter) compiles; later calls reuse it.
    """
    out = decode(model, prime, length, rng, temperature, filter_logits_fn, filter_thres, eos_token, mask, dtype=dtype)
    return out.tokens if eos_token is None else (out.tokens, out.lengths)
