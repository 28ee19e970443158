"""Language-model losses over many segments: one `lax.scan`, the memory as its carry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax._checks import check_int
from ct_jax.generation import generate  # noqa: F401  (public here: ct_jax.autoregressive.generate)
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer
from ct_jax.streams import StreamBatch

IGNORE_INDEX = -100  # as upstream's AutoregressiveWrapper


def token_nll(logits: Float[Array, "b t v"], targets: Int[Array, "b t"], ignore_index: int = IGNORE_INDEX):
    """(summed negative log-likelihood, number) of the targets != ignore_index."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    counted = targets != ignore_index
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(counted, -picked, 0.0)), jnp.sum(counted)


def cross_entropy(logits: Float[Array, "b t v"], targets: Int[Array, "b t"], ignore_index: int = IGNORE_INDEX):
    """Mean token cross-entropy over targets != ignore_index (torch's `F.cross_entropy`).

    A segment whose targets are all ignored gives 0 (torch gives NaN there).
    """
    total, count = token_nll(logits, targets, ignore_index)
    return total / jnp.maximum(count, 1)


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


class _Segments(NamedTuple):
    """A sequence cut for the segment loop: stacked full segments (scan inputs) and a short tail."""

    # (inputs, targets, masks, keys, resets[, LM denominators]), (n_full, b, seq_len, ...) / (n_full, ...)
    full: tuple | None
    tail: tuple | None  # (inputs, targets, mask, key, None) of the last, shorter segment


def _segments(tokens: jax.Array, mask: jax.Array | None, rng: jax.Array | None, seq_len: int) -> _Segments:
    """Shifts `tokens` into inputs and targets and cuts them (with mask and dropout keys) into segments."""
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape (batch, n * seq_len + 1) with length >= 2, got {tokens.shape}")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if mask is not None:
        if mask.shape == tokens.shape:
            mask = mask[:, :-1]
        if mask.shape != inputs.shape:
            raise ValueError(f"mask must have shape {tokens.shape} or {inputs.shape}, got {mask.shape}")
    return _cut(inputs, targets, mask, None, rng, seq_len)


def _cut(inputs: jax.Array, targets: jax.Array, mask: jax.Array | None, resets: jax.Array | None,
         rng: jax.Array | None, seq_len: int) -> _Segments:
    """Cuts inputs / targets / mask (b, l) and per-segment resets (b, n) into segments."""
    n_segments = -(-inputs.shape[1] // seq_len)
    keys = jax.random.split(rng, n_segments) if rng is not None else None
    full_inputs, tail_inputs = _split_segments(inputs, seq_len)
    full_targets, tail_targets = _split_segments(targets, seq_len)
    full_masks, tail_mask = _split_segments(mask, seq_len) if mask is not None else (None, None)
    n_full = 0 if full_inputs is None else full_inputs.shape[0]
    if resets is not None and (tail_inputs is not None or resets.shape != (inputs.shape[0], n_full)):
        raise ValueError(f"resets must have shape (batch, n_segments) = {(inputs.shape[0], n_full)} for "
                         f"{inputs.shape[1]} = n_segments * seq_len inputs, got {resets.shape}")
    full = tail = None
    if n_full:
        full = (full_inputs, full_targets, full_masks, keys[:n_full] if keys is not None else None,
                resets.T if resets is not None else None)
    if tail_inputs is not None:
        tail = (tail_inputs, tail_targets, tail_mask, keys[-1] if keys is not None else None, None)
    return _Segments(full, tail)


def _segment_loss(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, ignore_index: int,
                  memory_gradients: bool = False):
    """`loss(params, memories, inputs, targets, mask, key, reset, denominator) -> (lm + aux, (memories, lm, aux))`.

    `reset` (b,) bool or None: those rows' memory is emptied first (a new document).
    `denominator`: divides the summed token NLL (None: the mean over this segment's targets)."""

    def loss(params, memories, inputs, targets, mask, key, reset, denominator=None):
        if reset is not None:
            memories = memories.reset(reset)
        net = nnx.merge(graphdef, params, rest)
        rngs = nnx.Rngs(dropout=key) if key is not None else None
        logits, memories, aux = net(inputs, memories, mask, rngs=rngs, memory_gradients=memory_gradients)
        if denominator is None:
            lm = cross_entropy(logits, targets, ignore_index)
        else:
            lm = token_nll(logits, targets, ignore_index)[0] / denominator
        return lm + aux, (memories, lm, aux)

    return loss


def _run_segments(body: Callable, carry: Any, segments: _Segments) -> tuple[Any, jax.Array, jax.Array]:
    """`body(carry, xs) -> (carry, (lm, aux))` over the full segments (one `lax.scan`), then
    over the short tail; returns `(carry, lm_losses[n], aux_losses[n])`."""
    lm_losses, aux_losses = [], []
    if segments.full is not None:
        carry, (lm, aux) = jax.lax.scan(body, carry, segments.full)
        lm_losses.append(lm)
        aux_losses.append(aux)
    if segments.tail is not None:
        carry, (lm, aux) = body(carry, segments.tail)
        lm_losses.append(lm[None])
        aux_losses.append(aux[None])
    return carry, jnp.concatenate(lm_losses), jnp.concatenate(aux_losses)


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

    Inputs/targets are shifted by one and split into seq_len segments (a shorter last one
    is allowed); a `lax.scan` runs the full segments with the memory as carry (returned
    memories are stop-gradient, as the reference detaches), so compile time does not grow
    with n. `mask` may cover the inputs (l - 1) or the whole sequence (l; its last entry is
    dropped, as upstream). `rng` seeds dropout, one key per segment. `memory_gradients`:
    the carried memory keeps its gradient (for differentiating the result; the values are
    the same). Returns `(lm_losses[n], aux_losses[n], final_memories)`.
    """
    segments = _segments(tokens, mask, rng, model.config.seq_len)
    if memories is None:
        memories = Memory.empty(model, tokens.shape[0], model.dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = _segment_loss(graphdef, params, rest, ignore_index, memory_gradients)

    def body(memories, xs):
        _, (memories, lm, aux) = loss(params, memories, *xs)
        return memories, (lm, aux)

    memories, lm, aux = _run_segments(body, memories, segments)
    return lm, aux, memories


def _grads(model: CompressiveTransformer, segments: _Segments, memories: Memory, ignore_index: int, remat: bool,
           memory_gradients: bool = False):
    """(objective, lm_losses[n], aux_losses[n], grads, final memories) of cut segments from `memories`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = _segment_loss(graphdef, params, rest, ignore_index, memory_gradients)
    if memory_gradients:
        return _through_memory_grads(loss, params, memories, segments, remat)
    if remat:
        loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    value_and_grad = jax.value_and_grad(loss, has_aux=True)

    def body(carry, xs):
        memories, grad_sum = carry
        (_, (memories, lm, aux)), grads = value_and_grad(params, memories, *xs)
        return (memories, jax.tree.map(jnp.add, grad_sum, grads)), (lm, aux)

    (memories, grads), lm, aux = _run_segments(body, (memories, jax.tree.map(jnp.zeros_like, params)), segments)
    return jnp.sum(lm + aux), lm, aux, grads, memories


def _through_memory_grads(loss: Callable, params: nnx.State, memories: Memory, segments: _Segments, remat: bool):
    """`_grads` with memory gradients: one value_and_grad over the whole segment scan."""
    if remat:
        loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)

    def objective(params):
        def body(memories, xs):
            _, (memories, lm, aux) = loss(params, memories, *xs)
            return memories, (lm, aux)

        final, lm, aux = _run_segments(body, memories, segments)
        return jnp.sum(lm + aux), (lm, aux, final)

    (total, (lm, aux, final)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return total, lm, aux, grads, jax.lax.stop_gradient(final)


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
    """The objective `sum_segments(lm + aux)`, per-segment `(lm, aux)` and its gradient w.r.t. `nnx.Param`s.

    The reference runs one `(loss + aux_loss).backward()` per segment, and its carried memory
    is detached, so the segments' graphs are disjoint: each step of the `lax.scan` takes the
    forward and backward of one segment and adds its gradient to the carry. Only one segment's
    activations are ever live, and the backward runs right after its forward (no residuals
    stacked over segments). `remat` keeps only the weight matmuls' outputs and recomputes the
    rest (attention scores, elementwise ops) in the backward: less memory for long segments.

    `memory_gradients` (the paper's BPTT row): the carried memory is not detached, so the
    loss of later segments reaches what earlier segments stored and compressed; one backward
    runs through the whole scan and every segment's residuals stay live until it. With
    `remat` each segment then keeps only its input memory and is recomputed in the backward.
    Returns `(objective, lm_losses[n], aux_losses[n], grads)`.
    """
    segments = _segments(tokens, mask, rng, model.config.seq_len)
    if memories is None:
        memories = Memory.empty(model, tokens.shape[0], model.dtype)
    return _grads(model, segments, memories, ignore_index, remat, memory_gradients)[:4]


def _micro_split(x: jax.Array, micro_batches: int) -> jax.Array:
    # (b, ...) -> (m, b // m, ...), micro-batch j = rows j, j + m, j + 2m, ...: a strided
    # split keeps every micro-batch spread over the devices of a batch-sharded array.
    return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)


def _micro_join(x: jax.Array) -> jax.Array:
    # (m, b // m, ...) -> (b, ...): the inverse of _micro_split
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _split_memory(memories: Memory, micro_batches: int) -> Memory:
    """A full batch's memory as micro-batches (the leading axis), rows split as `_micro_split` does."""
    per_layer = lambda x: jnp.moveaxis(_micro_split(jnp.moveaxis(x, 1, 0), micro_batches), 1, 2)  # noqa: E731
    return Memory(per_layer(memories.mem), per_layer(memories.compressed_mem),
                  _micro_split(memories.mem_valid, micro_batches),
                  _micro_split(memories.compressed_mem_valid, micro_batches),
                  None if memories.mem_usage is None else per_layer(memories.mem_usage))


def _join_memory(memories: Memory) -> Memory:
    """The inverse of `_split_memory`."""
    per_layer = lambda x: jnp.moveaxis(_micro_join(jnp.moveaxis(x, 2, 1)), 0, 1)  # noqa: E731
    return Memory(per_layer(memories.mem), per_layer(memories.compressed_mem), _micro_join(memories.mem_valid),
                  _micro_join(memories.compressed_mem_valid),
                  None if memories.mem_usage is None else per_layer(memories.mem_usage))


def _check_micro_batches(batch: int, micro_batches: Any) -> None:
    check_int("micro_batches", micro_batches)
    if batch % micro_batches:
        raise ValueError(f"batch size ({batch}) must be divisible by micro_batches ({micro_batches})")


def _accumulate(model: CompressiveTransformer, run: Callable, rows: Any, memories: Memory | None,
                rng: jax.Array | None, micro_batches: int, split_memory: bool):
    """`run(net, rows, memories, key) -> (total, lm, aux, grads, memories)` over strided micro-batches
    of `rows` (a pytree of (b, ...) arrays), one `lax.scan` summing the gradients; returns the
    micro-batch means, the mean gradient and (with `split_memory`: `memories` are the full
    batch's, split like the rows) the final memories of the whole batch."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    keys = jax.random.split(rng, micro_batches) if rng is not None else None
    micro_rows = jax.tree.map(lambda x: _micro_split(x, micro_batches), rows)
    micro_memories = _split_memory(memories, micro_batches) if split_memory else None

    def accumulate(grad_sum, xs):
        rows, memory, key = xs
        total, lm, aux, grads, memory = run(nnx.merge(graphdef, params, rest), rows,
                                            memory if split_memory else memories, key)
        return jax.tree.map(jnp.add, grad_sum, grads), (total, lm, aux, memory)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (total, lm, aux, final) = jax.lax.scan(accumulate, zeros, (micro_rows, micro_memories, keys))
    grads = jax.tree.map(lambda g: g / micro_batches, grad_sum)
    return jnp.mean(total), jnp.mean(lm, axis=0), jnp.mean(aux, axis=0), grads, _join_memory(final)


def accumulated_grads(
    model: CompressiveTransformer,
    tokens: Int[Array, "b l"],
    mask: Bool[Array, "b _"] | None = None,
    rng: jax.Array | None = None,
    *,
    micro_batches: int = 1,
    memories: Memory | None = None,
    ignore_index: int = IGNORE_INDEX,
    remat: bool = False,
    memory_gradients: bool = False,
) -> tuple[Float[Array, ""], Float[Array, " n"], Float[Array, " n"], nnx.State]:
    """`sequence_grads` (objective, per-segment losses, gradient), averaged over micro-batches.

    The batch is cut into `micro_batches` equal, strided micro-batches (rows j, j+m, ...),
    each run from `memories` (per micro-batch, `b // micro_batches` rows; default empty) as
    the reference runs each `max_batch_size` chunk, and a `lax.scan` sums their gradients, so
    only one micro-batch's activations are live at a time. The result is the mean over
    micro-batches (the reference sums them; the mean keeps the update independent of
    `micro_batches`). Without ignored targets it equals the full-batch gradient up to
    rounding; with them, each micro-batch's mean counts its own targets. Returns
    `(objective, lm_losses[n], aux_losses[n], grads)`, losses averaged over micro-batches.
    """
    _check_micro_batches(tokens.shape[0], micro_batches)
    if micro_batches == 1:
        return sequence_grads(model, tokens, mask, memories, rng, ignore_index=ignore_index, remat=remat,
                              memory_gradients=memory_gradients)

    def run(net, rows, memories, key):
        tokens, mask = rows
        segments = _segments(tokens, mask, key, net.config.seq_len)
        if memories is None:
            memories = Memory.empty(net, tokens.shape[0], net.dtype)
        return _grads(net, segments, memories, ignore_index, remat, memory_gradients)

    return _accumulate(model, run, (tokens, mask), memories, rng, micro_batches, split_memory=False)[:4]


def stream_grads(
    model: CompressiveTransformer,
    batch: StreamBatch,
    memories: Memory,
    rng: jax.Array | None = None,
    *,
    micro_batches: int = 1,
    ignore_index: int = IGNORE_INDEX,
    remat: bool = False,
    memory_gradients: bool = False,
    axis_name: str | None = None,
) -> tuple[Float[Array, ""], Float[Array, " n"], Float[Array, " n"], nnx.State, Memory]:
    """`accumulated_grads` for a streamed batch (`ct_jax.streams.StreamBatch`, n * seq_len per row).

    Each row continues from its row of `memories` (the whole batch's, carried from the last
    step), emptied before the segments `batch.resets` marks; padded positions have ignored
    targets. Padding makes rows count different numbers of targets, so each segment's LM
    loss is the token mean over the whole batch (every micro-batch, and under `pmap` every
    device on `axis_name`, divides its NLL sum by the whole batch's count): the mean over
    micro-batches (and the `pmean` over devices) is the whole batch's loss and gradient.
    Returns `(objective, lm_losses[n], aux_losses[n], grads, final memories)`.
    """
    b = batch.inputs.shape[0]
    _check_micro_batches(b, micro_batches)
    seq_len = model.config.seq_len
    counted = jnp.sum((batch.targets != ignore_index).reshape(b, -1, seq_len), axis=(0, 2))  # (n,)
    shares = micro_batches
    if axis_name is not None:
        counted, shares = jax.lax.psum(counted, axis_name), shares * jax.lax.psum(1, axis_name)
    denominators = jnp.maximum(counted, 1).astype(jnp.float32) / shares

    def run(net, rows, memories, key):
        segments = _cut(rows.inputs, rows.targets, rows.mask, rows.resets, key, seq_len)
        segments = segments._replace(full=(*segments.full, denominators))
        return _grads(net, segments, memories, ignore_index, remat, memory_gradients)

    if micro_batches == 1:
        return run(model, batch, memories, rng)
    return _accumulate(model, run, batch, memories, rng, micro_batches, split_memory=True)


def stream_nll(
    model: CompressiveTransformer, batch: StreamBatch, memories: Memory, *, ignore_index: int = IGNORE_INDEX
) -> tuple[Float[Array, ""], Int[Array, ""], Memory]:
    """(summed NLL in nats, number of predicted tokens, final memories) of a streamed batch, no aux loss.

    As `stream_grads`' forward: rows continue from `memories`, reset where `batch.resets` says.
    """
    segments = _cut(batch.inputs, batch.targets, batch.mask, batch.resets, None, model.config.seq_len)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def body(carry, xs):
        memories, total, count = carry
        inputs, targets, mask, _, reset = xs
        logits, memories, _ = nnx.merge(graphdef, params, rest)(inputs, memories.reset(reset), mask)
        nll, n = token_nll(logits, targets, ignore_index)
        return (memories, total + nll, count + n), None

    zero = jnp.zeros((), jnp.float32)
    (memories, total, count), _ = jax.lax.scan(body, (memories, zero, jnp.zeros((), jnp.int32)), segments.full)
    return total, count, memories
