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
window), so a new token costs one attention row over memory + window. The cached calls run
the model's own layers (`CompressiveTransformer.run_layers` with one `LayerCache` per layer):
the same norms, gates, feed-forwards and attention as training. Three upstream
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

from ct_jax.attention import LayerCache
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
    caches: tuple[LayerCache, ...]  # per layer: K/V of the window and (memory layers) of cmem|mem per variant
    stream: Int[Array, "b n"]  # prime | generated tokens (| padding)
    pos: Int[Array, ""]  # the token to run next (the window's last)
    start: Int[Array, ""]  # where the current window starts
    call: Int[Array, ""]  # 1-based count of reference calls since the memory last changed
    tokens: Int[Array, "b l"]  # generated tokens, eos-padded
    logits: Float[Array, "b l v"] | None
    done: Bool[Array, " b"]
    lengths: Int[Array, " b"]


class _Loop(NamedTuple):
    """What every step of the compiled loop reads: the model and the sampling settings."""

    net: CompressiveTransformer  # in eval mode
    prime_len: Int[Array, ""]
    stream_mask: Bool[Array, "b n"]  # the prime's mask, then True
    rng: jax.Array
    temperature: Float[Array, ""]
    eos_token: Int[Array, ""]  # -1: none
    filter_fn: FilterFn | None
    filter_thres: float
    on_token: Callable | None


def _n_variants(config) -> int:
    return len(config.memory_layers) if config.enhanced_recurrence else 1


def _variants_at(config, layer: int) -> int:
    """How many variants of each row a layer runs: layers below the first memory layer do not vary."""
    return 1 if layer < min(config.memory_layers) else _n_variants(config)


def _rolled(memory: Memory, shift) -> Memory:
    """The memory as the reference passes it after `shift` rolls by -1 over the layer axis."""
    layers = memory.mem.shape[0]
    order = (jnp.arange(layers) + shift) % layers
    usage = None if memory.mem_usage is None else jnp.take(memory.mem_usage, order, axis=0)
    return memory._replace(mem=jnp.take(memory.mem, order, axis=0),
                           compressed_mem=jnp.take(memory.compressed_mem, order, axis=0), mem_usage=usage)


def _empty_caches(net: CompressiveTransformer, batch: int) -> tuple[LayerCache, ...]:
    """Every layer's cache with empty window slots and the empty memory's keys/values."""
    config, zero = net.config, jnp.zeros((), jnp.int32)
    caches = []
    for layer in range(1, config.depth + 1):
        window = jnp.zeros((_variants_at(config, layer) * batch, config.heads, config.seq_len, config.dim_head),
                           net.dtype)
        caches.append(LayerCache(window, window, None, None, None, jnp.zeros((1,), jnp.int32), zero, zero))
    return _with_memory(net, Memory.empty(net, batch, net.dtype), tuple(caches))


def _with_memory(net: CompressiveTransformer, memory: Memory, caches: tuple[LayerCache, ...]
                 ) -> tuple[LayerCache, ...]:
    """`caches` reading `memory`: each memory layer's K/V of `cmem | mem` for every variant v (the
    memory rolled v times, variant-major on the batch axis) and the valid counts. Every row of a
    generation is advanced by the same windows, so all rows hold equal counts: row 0's serve every
    row and variant (one row broadcasts: one position window per layer, not one per row)."""
    config = net.config
    layers = len(config.memory_layers)
    out = []
    for layer, cache in enumerate(caches, start=1):
        times = _variants_at(config, layer)
        cache = cache._replace(total_valid=memory.total_valid[:1])
        if layer in config.memory_layers:
            slot = config.memory_layers.index(layer)
            sources = [(slot + v) % layers for v in range(times)]
            mem = jnp.concatenate([memory.mem[source] for source in sources])
            cmem = jnp.concatenate([memory.compressed_mem[source] for source in sources])
            k, v = net.attn_layers[layer - 1].fn.keys_values(jnp.concatenate([cmem, mem], axis=1))
            cache = cache._replace(memory_k=k, memory_v=v, memory_valid=memory.slot_valid()[:1])
        out.append(cache)
    return tuple(out)


def _run_cached(net: CompressiveTransformer, tokens: Int[Array, "b n"], window_mask: Bool[Array, "b s"],
                caches: tuple[LayerCache, ...], start: Int[Array, ""] | int, end: Int[Array, ""]
                ) -> tuple[Float[Array, "v b d"], tuple[LayerCache, ...]]:
    """Runs `tokens`, window positions [start, start + n), through the model's layers from the
    caches, for every variant, in a window of `end` tokens.

    Returns the final hidden state at position end - 1, (V, b, d), and the updated caches.
    """
    start = jnp.asarray(start, jnp.int32)
    ran = net.run_layers(net.embed(tokens), None, window_mask,
                         cache=tuple(cache._replace(start=start, end=end) for cache in caches))
    last = jax.lax.dynamic_index_in_dim(ran.x, end - 1 - start, axis=1, keepdims=False)
    return last.reshape(_n_variants(net.config), -1, ran.x.shape[-1]), ran.cache


def _full_call(loop: _Loop, window: Int[Array, "b s"], window_mask: Bool[Array, "b s"], s: _State):
    """A call on a full window: the model's own forward (its memory update, and the logits of the
    last position only: (b, V), never (b, t, V)); it rolls the memory once more, as the reference's
    call does."""
    net = loop.net
    memory = _rolled(s.memory, s.call - 1) if _n_variants(net.config) > 1 else s.memory
    hidden, memory, _ = net.features(window, memory, window_mask)
    return memory, _with_memory(net, memory, s.caches), net.logits(hidden[:, -1])


def _cached_call(loop: _Loop, tokens: Int[Array, "b n"], start: Int[Array, ""] | int, filled: Int[Array, ""],
                 window_mask: Bool[Array, "b s"], s: _State):
    """A call through the cache: `tokens` at window positions [start, ...) in a window of `filled`
    tokens; the logits of the variant this call reads (the memory rolled `call` times)."""
    last, caches = _run_cached(loop.net, tokens, window_mask, s.caches, start, filled)
    return s.memory, caches, loop.net.logits(last[s.call % _n_variants(loop.net.config)])


def _call(loop: _Loop, s: _State, incremental_only: bool) -> _State:
    """One reference call. `incremental_only`: the caller knows it is a one-token cached call.

    At a window start, a window of prime tokens only is run whole (as the reference runs the
    prime's full windows) and the rest of the prime is the first sampling call's window, run at
    once: a padded prime token attends to the whole window (see the module docstring).
    """
    seq_len, prime_len = loop.net.config.seq_len, loop.prime_len
    pos = s.pos
    if not incremental_only:
        at_start = s.pos == s.start
        pos = jnp.where(at_start, jnp.where(s.start + seq_len <= prime_len, s.start + seq_len - 1,
                                            jnp.maximum(s.pos, prime_len - 1)), s.pos)
    filled = pos - s.start + 1
    window = jax.lax.dynamic_slice_in_dim(s.stream, s.start, seq_len, axis=1)
    window_mask = jax.lax.dynamic_slice_in_dim(loop.stream_mask, s.start, seq_len, axis=1)
    incremental = functools.partial(_cached_call, loop, jax.lax.dynamic_slice_in_dim(s.stream, pos, 1, axis=1),
                                    pos - s.start, filled, window_mask)
    if incremental_only:
        is_full = jnp.zeros((), bool)
        memory, caches, logits = incremental(s)
    else:
        is_full = filled == seq_len
        kind = jnp.where(is_full, 0, jnp.where(pos == prime_len - 1, 1, 2))
        branches = (functools.partial(_full_call, loop, window, window_mask),
                    functools.partial(_cached_call, loop, window, 0, filled, window_mask), incremental)
        memory, caches, logits = jax.lax.switch(kind, branches, s)
    return _advance(loop, s._replace(memory=memory, caches=caches), pos, is_full, logits)


def _advance(loop: _Loop, s: _State, pos: Int[Array, ""], is_full: Bool[Array, ""],
             logits: Float[Array, "b v"]) -> _State:
    """The state after the call at `pos`: the next token (drawn from `logits` past the prime,
    else the prime's), the outputs, the eos bookkeeping and the window's start."""
    has_eos = loop.eos_token >= 0
    pad = jnp.where(has_eos, loop.eos_token, 0)
    sampling = pos >= loop.prime_len - 1  # else a prime window: the next token is the prime's
    index = jnp.maximum(pos - (loop.prime_len - 1), 0)  # prime windows write index 0, overwritten later
    sample = draw(logits, jax.random.fold_in(loop.rng, index), loop.temperature, loop.filter_fn, loop.filter_thres)
    next_token = jnp.where(sampling, sample, jax.lax.dynamic_index_in_dim(s.stream, pos + 1, 1, keepdims=False))
    stream = jax.lax.dynamic_update_slice_in_dim(s.stream, next_token[:, None], pos + 1, axis=1)
    emitted = jnp.where(s.done, pad, sample)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, emitted[:, None], index, axis=1)
    logits_out = s.logits
    if logits_out is not None:
        logits_out = jax.lax.dynamic_update_slice_in_dim(logits_out, logits[:, None], index, axis=1)
    if loop.on_token is not None:
        jax.debug.callback(functools.partial(_report, loop.on_token), sampling, index, emitted, ordered=True)
    ends = sampling & has_eos & ~s.done & (sample == loop.eos_token)
    return s._replace(
        stream=stream, pos=pos + 1, start=jnp.where(is_full, pos + 1, s.start),
        call=jnp.where(is_full, 1, jnp.where(sampling, s.call + 1, s.call)),
        tokens=tokens, logits=logits_out, done=s.done | ends, lengths=jnp.where(ends, index + 1, s.lengths),
    )


def _keep_going(loop: _Loop, length: int, s: _State) -> Bool[Array, ""]:
    return (s.pos < loop.prime_len - 1 + length) & ~jnp.all(s.done)


def _incremental_next(loop: _Loop, length: int, s: _State) -> Bool[Array, ""]:
    """Inside a window, past the prime and short of full: the next call is one cached token."""
    return (_keep_going(loop, length, s) & (s.pos > s.start) & (s.pos - s.start + 1 < loop.net.config.seq_len)
            & (s.pos > loop.prime_len - 1))


def _body(loop: _Loop, length: int, s: _State) -> _State:
    """Any call, then the window's run of one-token calls in a loop of their own: its body has
    no branch, so the memory and its K/V pass through untouched (no per-token copies)."""
    s = _call(loop, s, incremental_only=False)
    return jax.lax.while_loop(functools.partial(_incremental_next, loop, length),
                              functools.partial(_call, loop, incremental_only=True), s)


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
    batch = prime.shape[0]
    stream_len = prime.shape[1] + length + config.seq_len  # room for a whole window past the end
    stream = jnp.pad(prime.astype(jnp.int32), ((0, 0), (0, stream_len - prime.shape[1])))
    stream_mask = jnp.pad(mask, ((0, 0), (0, stream_len - prime.shape[1])), constant_values=True)
    loop = _Loop(net, prime_len, stream_mask, rng, temperature, eos_token, filter_fn, filter_thres, on_token)
    pad = jnp.where(eos_token >= 0, eos_token, 0)
    init = _State(
        memory=Memory.empty(net, batch, net.dtype), caches=_empty_caches(net, batch), stream=stream,
        pos=jnp.zeros((), jnp.int32), start=jnp.zeros((), jnp.int32), call=jnp.ones((), jnp.int32),
        tokens=jnp.broadcast_to(pad, (batch, length)).astype(jnp.int32),
        logits=jnp.zeros((batch, length, config.num_tokens), wide(net.dtype)) if return_logits else None,
        done=jnp.zeros((batch,), bool), lengths=jnp.full((batch,), length, jnp.int32),
    )
    final = jax.lax.while_loop(functools.partial(_keep_going, loop, length), functools.partial(_body, loop, length),
                               init)
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


def _checked_inputs(config, prime, length, temperature, filter_logits_fn, filter_thres, eos_token, mask
                    ) -> tuple[Int[Array, "b p"], Bool[Array, "b p"], FilterFn | None]:
    """`decode`'s arguments checked, with errors that name them: (prime and mask as (b, p), the filter)."""
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
    return prime, mask, filter_logits_fn


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
    one_d = np.ndim(prime) == 1
    prime, mask, filter_logits_fn = _checked_inputs(config, prime, length, temperature, filter_logits_fn,
                                                    filter_thres, eos_token, mask)
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
