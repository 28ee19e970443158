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

Prompts of different lengths (`prompt_lengths`, or a list of prompts). Each row's windows are
cut from its own prime's left, so rows sit at different places in their windows. The stream
places each row so that all rows' windows line up: a row with fewer full prime windows than
the longest starts after that many windows of padding (full calls that leave its memory as it
is), so every full call falls on the same step for all rows. Within the first sampling window
the rows' primes end at different places: the first sampling call runs every row's part of
the window at once, each row up to its own last prime token (where it draws its first token);
then one-token calls advance all rows together, and a row whose tokens are still its prime's
("held") keeps the keys/values that first call wrote. Each row thus computes what it would
alone; memory counts, roll variants and lengths are per row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, no_type_check

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Shaped

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
    call: Int[Array, " b"]  # per row, 1-based count of reference calls since the memory last changed
    tokens: Int[Array, "b l"]  # generated tokens, eos-padded
    logits: Float[Array, "b l v"] | None
    done: Bool[Array, " b"]
    lengths: Int[Array, " b"]


class _Loop(NamedTuple):
    """What every step of the compiled loop reads: the model, the rows' primes and the sampling settings."""

    net: CompressiveTransformer  # in eval mode
    last_prime: Int[Array, " b"]  # per row, the stream position of its last prime token (its first draw reads it)
    prime_start: Int[Array, " b"]  # per row, where its prime starts (after whole windows of padding)
    stream_mask: Bool[Array, "b n"]  # the prime's mask, then True
    rng: jax.Array
    temperature: Float[Array, ""]
    eos_token: Int[Array, ""]  # -1: none
    filter_fn: FilterFn | None
    filter_thres: float
    on_token: Callable | None
    length: int  # tokens to generate per row
    ragged: bool  # rows may hold primes of different lengths (else every per-row count is equal)


def _n_variants(config) -> int:
    return len(config.memory_layers) if config.enhanced_recurrence else 1


def _variants_at(config, layer: int) -> int:
    """How many variants of each row a layer runs: layers below the first memory layer do not vary."""
    return 1 if layer < min(config.memory_layers) else _n_variants(config)


def _rolled(memory: Memory, shift: Int[Array, " b"]) -> Memory:
    """The memory as the reference passes it after `shift` rolls by -1 over the layer axis, per row."""
    layers, batch = memory.mem.shape[:2]
    order = (jnp.arange(layers)[:, None] + shift[None, :]) % layers  # [l, b]: the layer each row reads
    rows = jnp.arange(batch)[None, :]

    def take(buffer):
        return None if buffer is None else buffer[order, rows]

    return memory._replace(mem=take(memory.mem), compressed_mem=take(memory.compressed_mem),
                           mem_usage=take(memory.mem_usage))


def _per_layer_rows(values: Shaped[Array, " b"], rows: int) -> Shaped[Array, " r"]:
    """Per-row `values` repeated variant-major to a layer's `rows` (see `_variants_at`)."""
    return jnp.tile(values, rows // values.shape[0])


def _empty_caches(net: CompressiveTransformer, batch: int, ragged: bool) -> tuple[LayerCache, ...]:
    """Every layer's cache with empty window slots and the empty memory's keys/values."""
    config, zero = net.config, jnp.zeros((), jnp.int32)
    caches = []
    for layer in range(1, config.depth + 1):
        window = jnp.zeros((_variants_at(config, layer) * batch, config.heads, config.seq_len, config.dim_head),
                           net.dtype)
        caches.append(LayerCache(window, window, None, None, None, jnp.zeros((1,), jnp.int32), zero, zero))
    return _with_memory(net, Memory.empty(net, batch, net.dtype), tuple(caches), ragged)


def _with_memory(net: CompressiveTransformer, memory: Memory, caches: tuple[LayerCache, ...], ragged: bool
                 ) -> tuple[LayerCache, ...]:
    """`caches` reading `memory`: each memory layer's K/V of `cmem | mem` for every variant v (the
    memory rolled v times, variant-major on the batch axis) and the valid counts. Rows with equal
    prime lengths are advanced by the same windows and hold equal counts: row 0's then serve every
    row and variant (one row broadcasts: one position window per layer, not one per row);
    `ragged` rows keep their own."""
    config = net.config
    layers = len(config.memory_layers)
    total_valid, slot_valid = memory.total_valid, memory.slot_valid()
    if not ragged:
        total_valid, slot_valid = total_valid[:1], slot_valid[:1]
    out = []
    for layer, cache in enumerate(caches, start=1):
        times = _variants_at(config, layer)
        cache = cache._replace(total_valid=jnp.tile(total_valid, times) if ragged else total_valid)
        if layer in config.memory_layers:
            slot = config.memory_layers.index(layer)
            sources = [(slot + v) % layers for v in range(times)]
            mem = jnp.concatenate([memory.mem[source] for source in sources])
            cmem = jnp.concatenate([memory.compressed_mem[source] for source in sources])
            k, v = net.attn_layers[layer - 1].fn.keys_values(jnp.concatenate([cmem, mem], axis=1))
            memory_valid = jnp.tile(slot_valid, (times, 1)) if ragged else slot_valid
            cache = cache._replace(memory_k=k, memory_v=v, memory_valid=memory_valid)
        out.append(cache)
    return tuple(out)


def _run_cached(net: CompressiveTransformer, tokens: Int[Array, "b n"], window_mask: Bool[Array, "b s"],
                caches: tuple[LayerCache, ...], start: Int[Array, ""] | int, end: Int[Array, "*b"]
                ) -> tuple[Float[Array, "v b d"], tuple[LayerCache, ...]]:
    """Runs `tokens`, window positions [start, start + n), through the model's layers from the
    caches, for every variant, in a window of `end` tokens (one for all rows, or per row).

    Returns the final hidden state at position end - 1, (V, b, d), and the updated caches.
    """
    start = jnp.asarray(start, jnp.int32)
    # per row: each layer's rows (variant-major) get their row's end
    ends = [_per_layer_rows(end, cache.k.shape[0]) if end.ndim else end for cache in caches]
    ran = net.run_layers(net.embed(tokens), None, window_mask,
                         cache=tuple(cache._replace(start=start, end=e) for cache, e in zip(caches, ends)))
    updated = tuple(new._replace(start=old.start, end=old.end) for new, old in zip(ran.cache, caches))  # as they came
    if end.ndim:
        at = _per_layer_rows(end, ran.x.shape[0]) - 1 - start
        last = jnp.take_along_axis(ran.x, at[:, None, None], axis=1)[:, 0]
    else:
        last = jax.lax.dynamic_index_in_dim(ran.x, end - 1 - start, axis=1, keepdims=False)
    return last.reshape(_n_variants(net.config), -1, ran.x.shape[-1]), updated


def _kept_where_held(caches: tuple[LayerCache, ...], updated: tuple[LayerCache, ...], slot: Int[Array, ""],
                     held: Bool[Array, " b"]) -> tuple[LayerCache, ...]:
    """`updated` with window `slot` as in `caches` for the `held` rows: a held row's token there is its
    prime's, whose keys/values the first sampling call wrote (with its whole window, as alone)."""
    out = []
    for cache, new in zip(caches, updated):
        keep = _per_layer_rows(held, cache.k.shape[0])[:, None, None, None]

        def merged(old, fresh, keep=keep):
            old_slot, new_slot = (jax.lax.dynamic_slice_in_dim(t, slot, 1, axis=2) for t in (old, fresh))
            return jax.lax.dynamic_update_slice_in_dim(fresh, jnp.where(keep, old_slot, new_slot), slot, axis=2)

        out.append(new._replace(k=merged(cache.k, new.k), v=merged(cache.v, new.v)))
    return tuple(out)


@jax.named_scope("window_forward")  # scopes name the ops of a profile (ct_jax.bench.decode_profile)
def _full_call(loop: _Loop, window: Int[Array, "b s"], window_mask: Bool[Array, "b s"], s: _State):
    """A call on a full window: the model's own forward (its memory update, and the logits of the
    last position only: (b, V), never (b, t, V)); it rolls the memory once more, as the reference's
    call does. A row whose prime starts later (a window of padding) keeps its memory."""
    net = loop.net
    memory = _rolled(s.memory, s.call - 1) if _n_variants(net.config) > 1 else s.memory
    hidden, memory, _ = net.features(window, memory, window_mask)
    if loop.ragged:
        active = s.start >= loop.prime_start
        memory = jax.tree.map(lambda new, old: jnp.where(_rows_first(active, new), new, old).astype(new.dtype),
                              memory, s.memory)
    return memory, _with_memory(net, memory, s.caches, loop.ragged), net.logits(hidden[:, -1])


def _rows_first(rows: Bool[Array, " b"], like: jax.Array) -> jax.Array:
    """`rows` shaped to broadcast over `like`, whose row axis is its first (counts) or second (buffers)."""
    if like.ndim == 1:
        return rows
    return rows.reshape((1, -1) + (1,) * (like.ndim - 2))


@jax.named_scope("cached_call")
def _cached_call(loop: _Loop, tokens: Int[Array, "b n"], start: Int[Array, ""] | int, filled: Int[Array, "*b"],
                 window_mask: Bool[Array, "b s"], held: Bool[Array, " b"] | None, s: _State):
    """A call through the cache: `tokens` at window positions [start, ...) in a window of `filled`
    tokens (per row or for all); the logits of the variant each row reads (the memory rolled `call`
    times). `held` rows keep the keys/values of slot `start` (a one-token call; see `_kept_where_held`)."""
    last, caches = _run_cached(loop.net, tokens, window_mask, s.caches, start, filled)
    if held is not None:
        caches = _kept_where_held(s.caches, caches, jnp.asarray(start, jnp.int32), held)
    variant = s.call % _n_variants(loop.net.config)
    return s.memory, caches, loop.net.logits(last[variant, jnp.arange(last.shape[1])])


def _window_call(loop: _Loop, s: _State) -> _State:
    """A reference call that is not one cached token (`_token_call`): a full window through the model's
    forward, or the first sampling call.

    At a window start, a window of prime tokens only is run whole (as the reference runs the
    prime's full windows) and the rest of the prime is the first sampling call's window, run at
    once, each row up to its own last prime token: a padded prime token attends to the whole
    window (see the module docstring).
    """
    seq_len = loop.net.config.seq_len
    first = jnp.min(loop.last_prime)  # the first call that draws a token
    pos = jnp.where(s.pos == s.start, jnp.where(s.start + seq_len <= first + 1, s.start + seq_len - 1,
                                                jnp.maximum(s.pos, first)), s.pos)
    filled = pos - s.start + 1
    is_full = filled == seq_len
    window = jax.lax.dynamic_slice_in_dim(s.stream, s.start, seq_len, axis=1)
    window_mask = jax.lax.dynamic_slice_in_dim(loop.stream_mask, s.start, seq_len, axis=1)
    # the first sampling call: each row up to its own last prime token (a row whose window is full draws at the
    # full call that ends it)
    ends = jnp.minimum(loop.last_prime - s.start + 1, seq_len) if loop.ragged else filled
    memory, caches, logits = jax.lax.cond(is_full, functools.partial(_full_call, loop, window, window_mask),
                                          functools.partial(_cached_call, loop, window, 0, ends, window_mask, None), s)
    row_pos = jnp.where(is_full, pos, loop.last_prime)  # the position whose logits each row gets
    draws = jnp.where(is_full, pos >= loop.last_prime, loop.last_prime < s.start + seq_len - 1)
    return _advance(loop, s._replace(memory=memory, caches=caches), pos, row_pos, draws, is_full, logits)


def _token_call(loop: _Loop, s: _State) -> _State:
    """A reference call on a window short of full, past the first draw: one token through the cache (per row:
    rows whose prime goes on are carried along)."""
    pos, window_mask = s.pos, jax.lax.dynamic_slice_in_dim(loop.stream_mask, s.start, loop.net.config.seq_len, axis=1)
    # a row whose token at `pos` is still its prime's was run by the first sampling call: it keeps what that wrote
    held = (pos <= loop.last_prime) if loop.ragged else None
    memory, caches, logits = _cached_call(loop, jax.lax.dynamic_slice_in_dim(s.stream, pos, 1, axis=1),
                                          pos - s.start, pos - s.start + 1, window_mask, held, s)
    row_pos = jnp.broadcast_to(pos, loop.last_prime.shape)
    return _advance(loop, s._replace(memory=memory, caches=caches), pos, row_pos, pos > loop.last_prime,
                    jnp.zeros((), bool), logits)


@jax.named_scope("bookkeeping")
def _advance(loop: _Loop, s: _State, pos: Int[Array, ""], row_pos: Int[Array, " b"], draws: Bool[Array, " b"],
             is_full: Bool[Array, ""], logits: Float[Array, "b v"]) -> _State:
    """The state after the call at `pos`, each row having the logits of its `row_pos`: the `draws` rows
    draw their next token from them (the others have it in the stream: their prime's), the outputs,
    the eos bookkeeping and the window's start."""
    has_eos = loop.eos_token >= 0
    pad = jnp.where(has_eos, loop.eos_token, 0)
    index = row_pos - loop.last_prime  # per row, the token drawn now (0: the first)
    sampling = draws & (index < loop.length)
    step = jnp.maximum(pos - jnp.min(loop.last_prime), 0)
    sample = draw(logits, jax.random.fold_in(loop.rng, step), loop.temperature, loop.filter_fn, loop.filter_thres)
    rows = jnp.arange(sample.shape[0])
    stream = s.stream.at[rows, jnp.where(sampling, row_pos + 1, s.stream.shape[1])].set(sample, mode="drop")
    emitted = jnp.where(s.done, pad, sample)
    slot = jnp.where(sampling, index, loop.length)  # rows drawing nothing write nowhere
    tokens = s.tokens.at[rows, slot].set(emitted, mode="drop")
    logits_out = s.logits
    if logits_out is not None:
        logits_out = logits_out.at[rows, slot].set(logits.astype(logits_out.dtype), mode="drop")
    if loop.on_token is not None:
        jax.debug.callback(functools.partial(_report, loop.on_token), sampling, index, emitted, ordered=True)
    ends = sampling & has_eos & ~s.done & (sample == loop.eos_token)
    return s._replace(
        stream=stream, pos=pos + 1, start=jnp.where(is_full, pos + 1, s.start),
        call=jnp.where(is_full, 1, jnp.where(sampling, s.call + 1, s.call)),
        tokens=tokens, logits=logits_out, done=s.done | ends, lengths=jnp.where(ends, index + 1, s.lengths),
    )


def _keep_going(loop: _Loop, s: _State) -> Bool[Array, ""]:
    return (s.pos < jnp.max(loop.last_prime) + loop.length) & ~jnp.all(s.done)


def _token_next(loop: _Loop, s: _State) -> Bool[Array, ""]:
    """Past the first draw and short of a full window (its first token included): the next call is one cached
    token. Every other call is a full window or the first sampling call (`_window_call`)."""
    return (_keep_going(loop, s) & (s.pos - s.start + 1 < loop.net.config.seq_len)
            & (s.pos > jnp.min(loop.last_prime)))


def _body(loop: _Loop, s: _State) -> _State:
    """A window call, then the one-token calls up to the next full window in a loop of their own: its body
    has no branch, so the memory and its K/V pass through untouched (no per-token copies), and the program
    holds the model's layers three times (full window, first sampling call, one token)."""
    s = _window_call(loop, s)
    return jax.lax.while_loop(functools.partial(_token_next, loop), functools.partial(_token_call, loop), s)


def _placed(prime: Int[Array, "b p"], mask: Bool[Array, "b p"], prompt_lengths: Int[Array, " b"],
            offsets: Int[Array, " b"], seq_len: int, stream_len: int
            ) -> tuple[Int[Array, "b n"], Bool[Array, "b n"], Int[Array, " b"], Int[Array, " b"]]:
    """Each row's prime (`prompt_lengths` tokens from `offsets`) placed in a stream of `stream_len`
    so that all rows' windows line up: after whole windows of padding, as many as the row has
    fewer full prime windows than the longest. Returns (stream, its mask (True past the primes),
    each row's prime start, each row's last prime token)."""
    full_windows = (prompt_lengths - 1) // seq_len  # run before the window the row's first draw reads
    prime_start = (jnp.max(full_windows) - full_windows) * seq_len
    last_prime = prime_start + prompt_lengths - 1
    at = jnp.arange(stream_len)[None, :]
    inside = (at >= prime_start[:, None]) & (at <= last_prime[:, None])
    source = jnp.clip(at - prime_start[:, None] + offsets[:, None], 0, prime.shape[1] - 1)
    stream = jnp.where(inside, jnp.take_along_axis(prime.astype(jnp.int32), source, axis=1), 0)
    stream_mask = jnp.where(inside, jnp.take_along_axis(mask, source, axis=1), True)
    return stream, stream_mask, prime_start, last_prime


def _decode(graphdef, state, prime, prompt_lengths, offsets, mask, rng, temperature, eos_token, *, length: int,
            filter_fn: FilterFn | None, filter_thres: float, return_logits: bool, on_token, ragged: bool) -> Decoded:
    """The compiled loop. Row r of `prime` (b, capacity) holds `prompt_lengths[r]` (traced) tokens
    from `offsets[r]`; `ragged`: the lengths may differ.

    One iteration is one call of the reference: a full window (the prime's leading ones,
    which sample nothing, and every later one) through the model's forward; the first
    sampling call through the cache with all of its window's prime tokens at once; every
    other call through the cache with its one new token. `mask` covers `prime`.
    """
    net = nnx.merge(graphdef, state)
    net.eval()
    config = net.config
    batch = prime.shape[0]
    # room for the rows' padding windows, then a whole window past the end
    stream_len = prime.shape[1] + config.seq_len + length + config.seq_len
    stream, stream_mask, prime_start, last_prime = _placed(prime, mask, prompt_lengths, offsets, config.seq_len,
                                                           stream_len)
    loop = _Loop(net, last_prime, prime_start, stream_mask, rng, temperature, eos_token, filter_fn, filter_thres,
                 on_token, length, ragged)
    pad = jnp.where(eos_token >= 0, eos_token, 0)
    init = _State(
        memory=Memory.empty(net, batch, net.dtype), caches=_empty_caches(net, batch, ragged), stream=stream,
        pos=jnp.zeros((), jnp.int32), start=jnp.zeros((), jnp.int32), call=jnp.ones((batch,), jnp.int32),
        tokens=jnp.broadcast_to(pad, (batch, length)).astype(jnp.int32),
        logits=jnp.zeros((batch, length, config.num_tokens), wide(net.dtype)) if return_logits else None,
        done=jnp.zeros((batch,), bool), lengths=jnp.full((batch,), length, jnp.int32),
    )
    final = jax.lax.while_loop(functools.partial(_keep_going, loop), functools.partial(_body, loop), init)
    return Decoded(final.tokens, final.lengths, final.logits)


def _report(on_token, sampling, index, tokens) -> None:
    if sampling.any():
        on_token(np.where(sampling, index, -1), tokens)


_STATIC = dict(static_argnums=(0,),
               static_argnames=("length", "filter_fn", "filter_thres", "return_logits", "on_token", "ragged"))
# On CPU, XLA by default hands the one-query attention's multiply-reduces to its YNN library fusion, which ran
# them at a third of the speed of its own loops (docs/benchmarks.md, "Decoding against the floor"); the dots
# stay with YNN. Logits move by float32 rounding (<= 1e-7 in the tests' configs), tokens not.
CPU_DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
_decode_jit = jax.jit(_decode, **_STATIC)
_decode_jit_cpu = jax.jit(_decode, **_STATIC, compiler_options=CPU_DECODE_COMPILER_OPTIONS)


def _decoder():
    """The compiled loop: with `CPU_DECODE_COMPILER_OPTIONS` on CPU when called outside any trace (jax takes
    compiler options on top-level jits only; `trace_state_clean` is jax's own test, absent: the plain loop)."""
    from jax._src import core

    top_level = getattr(core, "trace_state_clean", lambda: False)()
    return _decode_jit_cpu if top_level and jax.default_backend() == "cpu" else _decode_jit


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


def _on_host(value: Any) -> Any:
    """`value` as a numpy array, a tracer as it is: decode's inputs are checked and laid out on the host, where
    each new prime shape would otherwise compile its own small programs (min, max, pad) before the loop."""
    return np.asarray(value) if _is_concrete(value) else value


def _numpy_for(*values: Any) -> Any:
    """The array module for `values`: numpy unless one is traced."""
    return np if all(_is_concrete(value) for value in values) else jnp


def _checked_inputs(config, prime, length, temperature, filter_logits_fn, filter_thres, eos_token, mask
                    ) -> tuple[Int[ArrayLike, "b p"], Bool[ArrayLike, "b p"], FilterFn | None]:
    """`decode`'s arguments checked, with errors that name them: (prime and mask as (b, p), on the host unless
    traced; the filter)."""
    prime = _on_host(prime)
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
        mask = np.ones(prime.shape, bool)
    mask = _on_host(mask)
    mask = mask[None] if one_d and mask.ndim == 1 else mask
    if mask.shape != prime.shape or mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a bool array of the prime's shape {prime.shape}, got {mask.dtype} {mask.shape}")
    if eos_token is not None and (isinstance(eos_token, bool) or not isinstance(eos_token, (int, np.integer))
                                  or not 0 <= eos_token < config.num_tokens):
        raise ValueError(f"eos_token must be None or an int in [0, {config.num_tokens}), got {eos_token!r}")
    return prime, mask, filter_logits_fn


PADDINGS = ("right", "left")


def _from_list(prime: Any) -> tuple[Any, np.ndarray | None]:
    """A list of prompts of different lengths as a right-padded (b, p) array and its lengths;
    anything else unchanged (lengths None)."""
    if not isinstance(prime, (list, tuple)) or not prime or not all(np.ndim(row) == 1 for row in prime):
        return prime, None
    rows = [np.asarray(row) for row in prime]
    lengths = np.array([len(row) for row in rows])
    if (lengths == lengths[0]).all():
        return np.stack(rows), None
    if lengths.min() < 1:
        raise ValueError(f"prime: every prompt must hold at least one token, got lengths {lengths.tolist()}")
    if any(not np.issubdtype(row.dtype, np.integer) for row in rows):
        raise ValueError(f"prime must be lists of token ids, got {sorted({str(row.dtype) for row in rows})}")
    padded = np.zeros((len(rows), lengths.max()), np.int64)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = row
    return padded, lengths


def _checked_lengths(prompt_lengths: Any, padding: str, prime: Int[ArrayLike, "b p"]) -> Int[ArrayLike, " b"] | None:
    """`prompt_lengths` as a (b,) int32 array (None stays None), checked against the (b, p) prime."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be 'right' or 'left' (where each row's padding sits), got {padding!r}")
    if prompt_lengths is None:
        return None
    lengths = _on_host(prompt_lengths)
    batch, width = prime.shape
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"prompt_lengths must be {batch} ints (one per prime row), "
                         f"got {lengths.dtype} {lengths.shape}")
    if _is_concrete(lengths) and not (int(lengths.min()) >= 1 and int(lengths.max()) <= width):
        raise ValueError(f"prompt_lengths must be in [1, {width}] (the prime's width), "
                         f"got {np.asarray(lengths).tolist()}")
    return lengths.astype(jnp.int32)


def _padding_zeroed(prime: Any, prompt_lengths: Any, padding: str) -> Any:
    """A concrete 2-D `prime` with token 0 where `prompt_lengths` marks padding (any value may sit
    there, e.g. -1); anything else unchanged (checked later)."""
    if prompt_lengths is None or not _is_concrete(prime) or not _is_concrete(prompt_lengths) or np.ndim(prime) != 2:
        return prime
    prime, lengths = np.asarray(prime), np.asarray(prompt_lengths)
    if lengths.shape != prime.shape[:1] or not np.issubdtype(lengths.dtype, np.integer):
        return prime  # `_checked_lengths` says why
    width = prime.shape[1]
    at = np.arange(width)[None, :]
    inside = at >= (width - lengths)[:, None] if padding == "left" else at < lengths[:, None]
    return np.where(inside, prime, 0).astype(prime.dtype)


def _prepared(model, prime, length, rng, temperature, filter_logits_fn, filter_thres, eos_token, mask, prompt_lengths,
              padding, return_logits, on_token, dtype) -> tuple[bool, int, functools.partial | None]:
    """`decode`'s arguments checked and laid out: (1-D prime, batch, the compiled loop's call; None for length 0)."""
    if dtype is not None:
        model = with_dtype(model, dtype)
    config = model.config
    prime, list_lengths = _from_list(prime)
    if list_lengths is not None:
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths: give the lengths or a list of prompts, not both")
        prompt_lengths = list_lengths
    one_d = np.ndim(prime) == 1
    if one_d and prompt_lengths is not None:
        raise ValueError(f"prompt_lengths needs a (b, p) prime, got a 1-D prime of shape {np.shape(prime)}")
    prime = _padding_zeroed(prime, prompt_lengths, padding)
    prime, mask, filter_logits_fn = _checked_inputs(config, prime, length, temperature, filter_logits_fn,
                                                    filter_thres, eos_token, mask)
    lengths = _checked_lengths(prompt_lengths, padding, prime)
    length = int(length)
    batch, width = prime.shape
    offsets = np.zeros((batch,), np.int32)
    ragged = lengths is not None
    if ragged and _is_concrete(lengths) and bool((lengths == lengths[0]).all()):  # one length: a plain prime
        start = width - int(lengths[0]) if padding == "left" else 0
        prime, mask = prime[:, start : start + int(lengths[0])], mask[:, start : start + int(lengths[0])]
        batch, width = prime.shape
        ragged = False
    if ragged:
        offsets = width - lengths if padding == "left" else offsets
    else:
        lengths = np.full((batch,), width, np.int32)
    if length == 0:
        return one_d, batch, None
    capacity = _prime_capacity(width)
    xp = _numpy_for(prime, mask)
    padded = xp.pad(prime.astype(np.int32), ((0, 0), (0, capacity - width)))
    mask = xp.pad(mask, ((0, 0), (0, capacity - width)), constant_values=True)
    graphdef, state = nnx.split(model)
    return one_d, batch, functools.partial(
        _decoder(), graphdef, state, padded, lengths, offsets, mask, rng,
        jnp.asarray(temperature, jnp.float32), jnp.asarray(-1 if eos_token is None else eos_token, jnp.int32),
        length=length, filter_fn=filter_logits_fn, filter_thres=float(filter_thres),
        return_logits=return_logits, on_token=on_token, ragged=ragged,
    )


@no_type_check  # checks its own arguments, with errors that name them
def decode(
    model: CompressiveTransformer,
    prime: Int[ArrayLike, "*b p"] | Sequence[Sequence[int]],
    length: int,
    rng: jax.Array,
    temperature: float | jax.Array = 1.0,
    filter_logits_fn: str | FilterFn | None = "top_k",
    filter_thres: float = 0.9,
    eos_token: int | None = None,
    mask: Bool[ArrayLike, "*b p"] | None = None,
    *,
    prompt_lengths: Int[ArrayLike, " b"] | None = None,
    padding: str = "right",
    return_logits: bool = False,
    on_token: Callable[[np.ndarray, np.ndarray], Any] | None = None,
    dtype: Any = None,
) -> Decoded:
    """`generate` with everything: tokens, lengths and (optionally) the logits of each draw.

    Prompts of different lengths: `prime` a list of prompts, or a (b, p) array with
    `prompt_lengths` (b,) and `padding` ("right": row r's prompt is its first
    prompt_lengths[r] tokens, "left": its last). Each row computes what it would alone (its own
    windows, memory and rolls); the rest of a row is ignored (`mask`, if given, has the prime's
    layout). `on_token(index, tokens)` (a hashable callable) is called from inside the compiled
    loop (`jax.debug.callback`, ordered) at each step where a row made a token: `tokens` (b,) and
    `index` (b,) each row's token index, -1 for a row that made none at this step.
    `dtype`: decode with the weights, activations, memory and cache in this dtype (e.g.
    `jnp.bfloat16`; `with_dtype`); None = the model's own (float32: exact, the default).
    bfloat16's agreement with float32 is `ct_jax.parity.BF16_DECODE_LOGITS_ATOL`.
    """
    one_d, batch, call = _prepared(model, prime, length, rng, temperature, filter_logits_fn, filter_thres, eos_token,
                                   mask, prompt_lengths, padding, return_logits, on_token, dtype)
    if call is None:  # nothing to generate
        num_tokens = model.config.num_tokens
        out = Decoded(jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch,), jnp.int32),
                      jnp.zeros((batch, 0, num_tokens), jnp.float32) if return_logits else None)
    else:
        out = call()
    if one_d:
        out = Decoded(out.tokens[0], out.lengths[0], None if out.logits is None else out.logits[0])
    return out


def decode_program(model: CompressiveTransformer, prime: Any, length: int, rng: jax.Array, **kwargs: Any) -> str:
    """The optimized HLO of the loop `decode(model, prime, length, rng, **kwargs)` runs (length >= 1), to name the
    ops of a profile (`ct_jax.bench.profiles`)."""
    names = ("temperature", "filter_logits_fn", "filter_thres", "eos_token", "mask", "prompt_lengths", "padding",
             "return_logits", "on_token", "dtype")
    defaults = dict(temperature=1.0, filter_logits_fn="top_k", filter_thres=0.9, eos_token=None, mask=None,
                    prompt_lengths=None, padding="right", return_logits=False, on_token=None, dtype=None)
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(f"decode_program takes decode's keywords {names}, got {unknown}")
    settings = defaults | kwargs
    _, _, call = _prepared(model, prime, length, rng, *(settings[name] for name in names))
    if call is None:
        raise ValueError(f"length must be >= 1 for a program to exist, got {length!r}")
    return call.func.lower(*call.args, **call.keywords).compile().as_text()


@no_type_check  # checks its own arguments, with errors that name them
def generate(
    model: CompressiveTransformer,
    prime: Int[ArrayLike, "*b p"] | Sequence[Sequence[int]],
    length: int,
    rng: jax.Array,
    temperature: float | jax.Array = 1.0,
    filter_logits_fn: str | FilterFn | None = "top_k",
    filter_thres: float = 0.9,
    eos_token: int | None = None,
    mask: Bool[ArrayLike, "*b p"] | None = None,
    *,
    prompt_lengths: Int[ArrayLike, " b"] | None = None,
    padding: str = "right",
    dtype: Any = None,
) -> Int[Array, "*b n"] | tuple[Int[Array, "*b n"], Int[Array, "*b"]]:
    """Samples `length` tokens after `prime` in one compiled call; same windows and memory as
    `ct_torch_ref`'s generate.

    prime: (b, p) or (p,) token ids, any p >= 1; a 1-D prime gives 1-D results. Prompts of
    different lengths: a list of prompts, or `prompt_lengths` (b,) with `padding` "right" or
    "left" (see `decode`); each row then computes what it would alone.
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
    out = decode(model, prime, length, rng, temperature, filter_logits_fn, filter_thres, eos_token, mask,
                 prompt_lengths=prompt_lengths, padding=padding, dtype=dtype)
    return out.tokens if eos_token is None else (out.tokens, out.lengths)
