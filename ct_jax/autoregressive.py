"""Language-model losses and gradients over many segments: one `lax.scan`, the memory as its carry.

One data contract: a batch is a `ct_jax.streams.StreamBatch` (inputs, targets, mask and a
reset per row and segment). A window of tokens from empty memory is
`StreamBatch.from_windows(tokens, seq_len)`, a batch whose rows reset before segment 0. One
loss function (`losses`) and one gradient function (`grads`) run every batch; `segment_losses`
and `sequence_grads` are their short forms for a window of tokens. Called eagerly, they refuse
token ids outside [0, num_tokens) with a ValueError, as `model(...)` does; under `jit` the ids
are traced and only the model's `checkify` check covers them (see ct_jax.validation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax._checks import check_choice, check_int
from ct_jax._host import to_device
from ct_jax.generation import generate  # noqa: F401  (public here: ct_jax.autoregressive.generate)
from ct_jax.memory import KNOCKOUTS, Memory
from ct_jax.model import CompressiveTransformer
from ct_jax.streams import IGNORE_INDEX, StreamBatch
from ct_jax.validation import check_batch_ids

__all__ = ["IGNORE_INDEX", "Gradients", "Losses", "StreamBatch", "cross_entropy", "generate", "grads", "losses",
           "segment_losses", "sequence_grads", "token_nll", "token_nlls"]


def _nlls_counted(logits: Float[Array, "b t v"], targets: Int[Array, "b t"], ignore_index: int
                  ) -> tuple[Float[Array, "b t"], Bool[Array, "b t"]]:
    """(each target's negative log-likelihood, 0 where not counted; which targets are != ignore_index)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    counted = targets != ignore_index
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(counted, -picked, 0.0), counted


def token_nlls(logits: Float[Array, "b t v"], targets: Int[Array, "b t"], ignore_index: int = IGNORE_INDEX
               ) -> Float[Array, "b t"]:
    """Negative log-likelihood of each target, 0 where targets == ignore_index."""
    return _nlls_counted(logits, targets, ignore_index)[0]


def token_nll(logits: Float[Array, "b t v"], targets: Int[Array, "b t"], ignore_index: int = IGNORE_INDEX):
    """(summed negative log-likelihood, number) of the targets != ignore_index."""
    nlls, counted = _nlls_counted(logits, targets, ignore_index)
    return jnp.sum(nlls), jnp.sum(counted)


def cross_entropy(logits: Float[Array, "b t v"], targets: Int[Array, "b t"], ignore_index: int = IGNORE_INDEX):
    """Mean token cross-entropy over targets != ignore_index (torch's `F.cross_entropy`).

    A segment whose targets are all ignored gives 0 (torch gives NaN there).
    """
    total, count = token_nll(logits, targets, ignore_index)
    return total / jnp.maximum(count, 1)


class Losses(NamedTuple):
    """What `losses` returns: per-segment losses and token counts, and the memories the rows end with."""

    lm_losses: Float[Array, " n"]  # per segment: the token mean (or NLL / batch denominator, `batch_mean`)
    aux_losses: Float[Array, " n"]
    nll: Float[Array, " n"]  # per segment: summed NLL of the counted targets, nats
    counts: Int[Array, " n"]  # per segment: counted targets (!= ignore_index)
    memories: Memory
    token_nll: Float[Array, "n b t"] | None = None  # asked for (`per_token`): each target's NLL, 0 where ignored
    # asked for (`attention_mass`): per segment and layer, the mass on cmem | mem | segment summed
    # over the real queries (`ct_jax.attention.attention_mass`); over all segments it divides by `mask.sum()`
    attention_mass: Float[Array, "n l 3"] | None = None


class Gradients(NamedTuple):
    """What `grads` returns; with micro-batches the objective, losses and gradient are micro-batch means."""

    objective: Float[Array, ""]  # sum over segments of lm + aux
    lm_losses: Float[Array, " n"]
    aux_losses: Float[Array, " n"]
    grads: nnx.State  # d objective / d every nnx.Param
    memories: Memory  # the rows' final memories, stop-gradient (the whole batch's rows, in order)


class _Segment(NamedTuple):
    """One segment's inputs to the loss; as scan inputs every field is stacked over segments first."""

    inputs: jax.Array  # (b, t) int
    targets: jax.Array  # (b, t) int, ignore_index where not counted
    mask: jax.Array | None  # (b, t) bool, True = real token; None: all real
    key: jax.Array | None  # dropout key (None: the model's own streams)
    reset: jax.Array  # (b,) bool: these rows' memory is emptied first
    denominator: jax.Array | None  # () divides the summed NLL; None: the segment's own token mean


class _SegmentResult(NamedTuple):
    """What one segment yields (the scan stacks it over segments)."""

    lm: jax.Array
    aux: jax.Array
    nll: jax.Array
    count: jax.Array
    token_nll: jax.Array | None = None  # (b, t), asked for
    attention_mass: jax.Array | None = None  # (l, 3), asked for


class _Segments(NamedTuple):
    """A batch cut for the segment loop: stacked full segments (scan inputs) and a short tail."""

    full: _Segment | None  # fields (n_full, ...)
    tail: _Segment | None  # the last, shorter segment


def _split_segments(x: jax.Array, seq_len: int) -> tuple[jax.Array | None, jax.Array | None]:
    """(n_full, b, seq_len, ...) full segments and the (b, rest, ...) short tail (or None)."""
    b, length = x.shape[:2]
    n_full, rest = divmod(length, seq_len)
    full = None
    if n_full:
        full = x[:, : n_full * seq_len].reshape(b, n_full, seq_len, *x.shape[2:])
        full = jnp.moveaxis(full, 1, 0)
    tail = x[:, n_full * seq_len :] if rest else None
    return full, tail


def _cut(batch: StreamBatch, rng: jax.Array | None, seq_len: int, denominators: jax.Array | None) -> _Segments:
    """Cuts a batch (with one dropout key and one denominator per segment) into segments."""
    b, length = batch.inputs.shape
    n_segments = -(-length // seq_len)
    if tuple(batch.resets.shape) != (b, n_segments):
        raise ValueError(f"resets must have shape (batch, n_segments) = {(b, n_segments)} for {length} inputs "
                         f"in segments of {seq_len}, got {tuple(batch.resets.shape)}")
    n_full = length // seq_len
    keys = jax.random.split(rng, n_segments) if rng is not None else None
    full_inputs, tail_inputs = _split_segments(batch.inputs, seq_len)
    full_targets, tail_targets = _split_segments(batch.targets, seq_len)
    full_masks, tail_mask = _split_segments(batch.mask, seq_len) if batch.mask is not None else (None, None)
    resets = batch.resets.T  # (n, b)
    full = tail = None
    if n_full:
        full = _Segment(full_inputs, full_targets, full_masks, None if keys is None else keys[:n_full],
                        resets[:n_full], None if denominators is None else denominators[:n_full])
    if tail_inputs is not None:
        tail = _Segment(tail_inputs, tail_targets, tail_mask, None if keys is None else keys[-1], resets[-1],
                        None if denominators is None else denominators[-1])
    return _Segments(full, tail)


def _target_nlls(net: CompressiveTransformer, hidden: Float[Array, "b t d"], targets: Int[Array, "b t"],
                 ignore_index: int) -> tuple[Float[Array, "b t"], Bool[Array, "b t"]]:
    """`_nlls_counted` from the last layer's stream: of the full logits, or (adaptive) the adaptive
    softmax's per-target NLL, which never builds the (b, t, num_tokens) log-probabilities."""
    if not net.config.adaptive:
        return _nlls_counted(net.logits(hidden), targets, ignore_index)
    return net.adaptive_nll(hidden, targets, ignore_index), targets != ignore_index


class _Measures(NamedTuple):
    """What `_segment_loss` measures beyond the loss (evaluation's options; the defaults change nothing)."""

    knockout: str | None = None  # `Memory.knocked_out`'s part, emptied before every segment
    per_token: bool = False  # each target's NLL
    attention_mass: bool = False  # each layer's attention mass (`CompressiveTransformer.features`)


_NO_MEASURES = _Measures()


def _features_with_mass(net: CompressiveTransformer, *args: Any, **kwargs: Any):
    """`net.features(*args, **kwargs)` sowing its attention mass (for `nnx.capture`)."""
    return net.features(*args, attention_mass=True, **kwargs)


def _segment_loss(graphdef: nnx.GraphDef, rest: nnx.State, ignore_index: int, memory_gradients: bool,
                  measures: _Measures = _NO_MEASURES) -> Callable:
    """`loss(params, memories, segment) -> (lm + aux, (memories, _SegmentResult))` of one segment."""

    def loss(params: nnx.State, memories: Memory, segment: _Segment):
        memories = memories.reset(segment.reset)
        if measures.knockout is not None:
            memories = memories.knocked_out(measures.knockout)
        net = nnx.merge(graphdef, params, rest)
        rngs = nnx.Rngs(dropout=segment.key) if segment.key is not None else None
        mass = None
        if measures.attention_mass:  # the mass `features` sows
            (hidden, memories, aux), sown = nnx.capture(_features_with_mass, nnx.Intermediate)(
                net, segment.inputs, memories, segment.mask, rngs=rngs, memory_gradients=memory_gradients)
            mass = sown["attention_mass"][0]
        else:
            hidden, memories, aux = net.features(segment.inputs, memories, segment.mask, rngs=rngs,
                                                 memory_gradients=memory_gradients)
        nlls, counted = _target_nlls(net, hidden, segment.targets, ignore_index)
        nll, count = jnp.sum(nlls), jnp.sum(counted)
        # the segment's token mean is `cross_entropy`'s formula, to the bit
        lm = nll / (jnp.maximum(count, 1) if segment.denominator is None else segment.denominator)
        return lm + aux, (memories, _SegmentResult(lm, aux, nll, count, nlls if measures.per_token else None, mass))

    return loss


def _add_segment_axis(x: jax.Array) -> jax.Array:
    return x[None]


def _concatenate(*parts: jax.Array) -> jax.Array:
    return jnp.concatenate(parts)


def _run_segments(body: Callable, carry: Any, segments: _Segments) -> tuple[Any, _SegmentResult]:
    """`body(carry, segment) -> (carry, _SegmentResult)` over the full segments (one `lax.scan`),
    then over the short tail; returns the carry and the results stacked over all n segments."""
    results = []
    if segments.full is not None:
        carry, result = jax.lax.scan(body, carry, segments.full)
        results.append(result)
    if segments.tail is not None:
        carry, result = body(carry, segments.tail)
        results.append(jax.tree.map(_add_segment_axis, result))
    return carry, jax.tree.map(_concatenate, *results)


def _denominators(batch: StreamBatch, seq_len: int, ignore_index: int, micro_batches: int,
                  axis_name: str | None) -> jax.Array:
    """(n,) per segment: the whole batch's counted targets over the shares dividing it (micro-batches, devices)."""
    b, length = batch.targets.shape
    n_segments = -(-length // seq_len)
    counted = batch.targets != ignore_index
    if n_segments * seq_len != length:  # a short last segment: pad it with uncounted targets
        counted = jnp.pad(counted, ((0, 0), (0, n_segments * seq_len - length)))
    counted = jnp.sum(counted.reshape(b, n_segments, seq_len), axis=(0, 2))  # (n,)
    shares = micro_batches
    if axis_name is not None:
        counted, shares = jax.lax.psum(counted, axis_name), shares * jax.lax.psum(1, axis_name)
    return jnp.maximum(counted, 1).astype(jnp.float32) / shares


def losses(
    model: CompressiveTransformer,
    batch: StreamBatch,
    memories: Memory | None = None,
    rng: jax.Array | None = None,
    *,
    batch_mean: bool = False,
    axis_name: str | None = None,
    ignore_index: int = IGNORE_INDEX,
    memory_gradients: bool = False,
    knockout: str | None = None,
    per_token: bool = False,
    attention_mass: bool = False,
) -> Losses:
    """Per-segment losses of a batch, its rows continuing from `memories` (None: empty), emptied where
    `batch.resets` says; one `lax.scan` over the full segments (a shorter last one is allowed), so
    compile time does not grow with their number.

    Each segment's LM loss is its token mean (`cross_entropy`, upstream's wrapper), or with
    `batch_mean` its summed NLL over the whole batch's count of that segment's targets (over
    the devices on `axis_name` too), so rows of unequal padding add up to the batch's mean.
    `rng` seeds dropout, one key per segment. `memory_gradients`: the carried memory keeps its
    gradient (for differentiating the result; the values are the same).
    Measures for evaluation: `knockout` ("compressed" or "memory", `Memory.KNOCKOUTS`) empties
    that part of every row's memory before every segment; `per_token` returns each target's NLL,
    `attention_mass` each layer's attention mass (see `Losses`).
    """
    if knockout is not None:
        check_choice("knockout", knockout, KNOCKOUTS)
    seq_len = model.config.seq_len
    check_batch_ids(batch.inputs, batch.targets, model.config, ignore_index)
    batch = jax.tree.map(to_device, batch)  # numpy from a sampler, or from_windows' resets
    if memories is None:
        memories = Memory.empty(model, batch.inputs.shape[0], model.dtype)
    denominators = _denominators(batch, seq_len, ignore_index, 1, axis_name) if batch_mean else None
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = _segment_loss(graphdef, rest, ignore_index, memory_gradients,
                         _Measures(knockout, per_token, attention_mass))

    def body(memories: Memory, segment: _Segment):
        _, (memories, result) = loss(params, memories, segment)
        return memories, result

    memories, result = _run_segments(body, memories, _cut(batch, rng, seq_len, denominators))
    return Losses(result.lm, result.aux, result.nll, result.count, memories, result.token_nll, result.attention_mass)


def _grads(model: CompressiveTransformer, segments: _Segments, memories: Memory, ignore_index: int, remat: bool,
           memory_gradients: bool) -> Gradients:
    """`Gradients` of cut segments from `memories`: per segment, its forward then its backward."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = _segment_loss(graphdef, rest, ignore_index, memory_gradients)
    if memory_gradients:
        return _through_memory_grads(loss, params, memories, segments, remat)
    if remat:
        loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    value_and_grad = jax.value_and_grad(loss, has_aux=True)

    def body(carry: tuple[Memory, nnx.State], segment: _Segment):
        memories, grad_sum = carry
        (_, (memories, result)), grads = value_and_grad(params, memories, segment)
        return (memories, jax.tree.map(jnp.add, grad_sum, grads)), result

    (memories, grads), result = _run_segments(body, (memories, jax.tree.map(jnp.zeros_like, params)), segments)
    return Gradients(jnp.sum(result.lm + result.aux), result.lm, result.aux, grads, memories)


def _through_memory_grads(loss: Callable, params: nnx.State, memories: Memory, segments: _Segments,
                          remat: bool) -> Gradients:
    """`_grads` with memory gradients: one value_and_grad over the whole segment scan."""
    if remat:
        loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)

    def objective(params: nnx.State):
        def body(memories: Memory, segment: _Segment):
            _, (memories, result) = loss(params, memories, segment)
            return memories, result

        final, result = _run_segments(body, memories, segments)
        return jnp.sum(result.lm + result.aux), (result, final)

    (total, (result, final)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return Gradients(total, result.lm, result.aux, grads, jax.lax.stop_gradient(final))


def _micro_split(x: jax.Array, micro_batches: int) -> jax.Array:
    # (b, ...) -> (m, b // m, ...), micro-batch j = rows j, j + m, j + 2m, ...: a strided
    # split keeps every micro-batch spread over the devices of a batch-sharded array.
    return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)


def _micro_join(x: jax.Array) -> jax.Array:
    # (m, b // m, ...) -> (b, ...): the inverse of _micro_split
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _split_layers(x: jax.Array, micro_batches: int) -> jax.Array:
    # (l, b, ...) -> (m, l, b // m, ...)
    return jnp.moveaxis(_micro_split(jnp.moveaxis(x, 1, 0), micro_batches), 1, 2)


def _join_layers(x: jax.Array) -> jax.Array:
    # (m, l, b // m, ...) -> (l, b, ...): the inverse of _split_layers
    return jnp.moveaxis(_micro_join(jnp.moveaxis(x, 2, 1)), 0, 1)


def _split_memory(memories: Memory, micro_batches: int) -> Memory:
    """A full batch's memory as micro-batches (the leading axis), rows split as `_micro_split` does."""
    per_layer = functools.partial(_split_layers, micro_batches=micro_batches)
    return Memory(per_layer(memories.mem), per_layer(memories.compressed_mem),
                  _micro_split(memories.mem_valid, micro_batches),
                  _micro_split(memories.compressed_mem_valid, micro_batches),
                  None if memories.mem_usage is None else per_layer(memories.mem_usage))


def _join_memory(memories: Memory) -> Memory:
    """The inverse of `_split_memory`."""
    return Memory(_join_layers(memories.mem), _join_layers(memories.compressed_mem), _micro_join(memories.mem_valid),
                  _micro_join(memories.compressed_mem_valid),
                  None if memories.mem_usage is None else _join_layers(memories.mem_usage))


def _accumulate(model: CompressiveTransformer, run: Callable, batch: StreamBatch, memories: Memory,
                rng: jax.Array | None, micro_batches: int) -> Gradients:
    """`run(net, rows, memories, key) -> Gradients` over strided micro-batches of the batch and its
    memories, one `lax.scan` summing the gradients; the micro-batch means and the final memories
    of the whole batch."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    keys = jax.random.split(rng, micro_batches) if rng is not None else None
    micro_rows = jax.tree.map(functools.partial(_micro_split, micro_batches=micro_batches), batch)

    def accumulate(grad_sum: nnx.State, xs: tuple) -> tuple[nnx.State, Gradients]:
        rows, memory, key = xs
        result = run(nnx.merge(graphdef, params, rest), rows, memory, key)
        return jax.tree.map(jnp.add, grad_sum, result.grads), result._replace(grads=None)

    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (micro_rows, _split_memory(memories, micro_batches), keys)
    grad_sum, stacked = jax.lax.scan(accumulate, zeros, xs)
    grads = jax.tree.map(lambda g: g / micro_batches, grad_sum)
    return Gradients(jnp.mean(stacked.objective), jnp.mean(stacked.lm_losses, axis=0),
                     jnp.mean(stacked.aux_losses, axis=0), grads, _join_memory(stacked.memories))


def grads(
    model: CompressiveTransformer,
    batch: StreamBatch,
    memories: Memory | None = None,
    rng: jax.Array | None = None,
    *,
    micro_batches: int = 1,
    remat: bool = False,
    memory_gradients: bool = False,
    batch_mean: bool = False,
    axis_name: str | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Gradients:
    """The objective `sum_segments(lm + aux)` of a batch (`losses`), its gradient w.r.t. the
    `nnx.Param`s, and the rows' final memories: the one gradient function of training.

    The reference runs one `(loss + aux_loss).backward()` per segment, and its carried memory
    is detached, so the segments' graphs are disjoint: each step of the `lax.scan` takes the
    forward and backward of one segment and adds its gradient to the carry. Only one segment's
    activations are ever live. `remat` keeps only the weight matmuls' outputs and recomputes
    the rest in the backward: less memory for long segments.

    `memory_gradients` (the paper's BPTT row): the carried memory is not detached, so the loss
    of later segments reaches what earlier segments stored and compressed; one backward runs
    through the whole scan (with `remat` each segment keeps only its input memory).

    `micro_batches`: the batch (and `memories`, the whole batch's) is cut into equal strided
    micro-batches (rows j, j+m, ...), as the reference runs each `max_batch_size` chunk, and a
    `lax.scan` sums their gradients, so only one micro-batch's activations are live. The result
    is the mean over micro-batches (the reference sums them; the mean keeps the update
    independent of `micro_batches`). Per-segment token means (the default) count each
    micro-batch's own targets; `batch_mean` divides every micro-batch's (and every device's
    on `axis_name`) NLL by the whole batch's count, so the mean is the whole batch's loss
    whatever the padding (streams).
    """
    b = batch.inputs.shape[0]
    check_int("micro_batches", micro_batches)
    if b % micro_batches:
        raise ValueError(f"batch size ({b}) must be divisible by micro_batches ({micro_batches})")
    seq_len = model.config.seq_len
    check_batch_ids(batch.inputs, batch.targets, model.config, ignore_index)
    batch = jax.tree.map(to_device, batch)  # numpy from a sampler, or from_windows' resets
    if memories is None:
        memories = Memory.empty(model, b, model.dtype)
    denominators = _denominators(batch, seq_len, ignore_index, micro_batches, axis_name) if batch_mean else None

    def run(net: CompressiveTransformer, rows: StreamBatch, memories: Memory, key: jax.Array | None) -> Gradients:
        segments = _cut(rows, key, seq_len, denominators)
        return _grads(net, segments, memories, ignore_index, remat, memory_gradients)

    if micro_batches == 1:
        return run(model, batch, memories, rng)
    return _accumulate(model, run, batch, memories, rng, micro_batches)


def segment_losses(
    model: CompressiveTransformer,
    tokens: Int[Array, "b l"],
    mask: Bool[Array, "b _"] | None = None,
    memories: Memory | None = None,
    rng: jax.Array | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    memory_gradients: bool = False,
) -> tuple[Float[Array, " n"], Float[Array, " n"], Memory]:
    """Per-segment LM and aux losses of `tokens` (b, n*seq_len + 1), as upstream's wrapper yields.

    The short form of `losses` for a window: inputs/targets are shifted by one and split into
    seq_len segments (a shorter last one is allowed), continuing from `memories` (None: empty;
    returned memories are stop-gradient, as the reference detaches). `mask` may cover the
    inputs (l - 1) or the whole sequence (l; its last entry is dropped, as upstream). `rng`
    seeds dropout, one key per segment. Returns `(lm_losses[n], aux_losses[n], final_memories)`.
    """
    batch = StreamBatch.from_windows(tokens, model.config.seq_len, mask, reset=memories is None)
    result = losses(model, batch, memories, rng, ignore_index=ignore_index, memory_gradients=memory_gradients)
    return result.lm_losses, result.aux_losses, result.memories


def sequence_grads(
    model: CompressiveTransformer,
    tokens: Int[Array, "b l"],
    mask: Bool[Array, "b _"] | None = None,
    memories: Memory | None = None,
    rng: jax.Array | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    remat: bool = False,
    memory_gradients: bool = False,
) -> tuple[Float[Array, ""], Float[Array, " n"], Float[Array, " n"], nnx.State]:
    """`grads` of a window of tokens as `segment_losses` takes them: `(objective, lm_losses[n], aux_losses[n],
    grads)` (kept as the short form README and callers use)."""
    batch = StreamBatch.from_windows(tokens, model.config.seq_len, mask, reset=memories is None)
    result = grads(model, batch, memories, rng, ignore_index=ignore_index, remat=remat,
                   memory_gradients=memory_gradients)
    return result.objective, result.lm_losses, result.aux_losses, result.grads
