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

IGNORE_INDEX = -100  # as upstream's AutoregressiveWrapper


def cross_entropy(logits: Float[Array, "b t v"], targets: Int[Array, "b t"], ignore_index: int = IGNORE_INDEX):
    """Mean token cross-entropy over targets != ignore_index (torch's `F.cross_entropy`).

    A segment whose targets are all ignored gives 0 (torch gives NaN there).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    counted = targets != ignore_index
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(counted, -picked, 0.0))
    count = jnp.sum(counted)
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

    full: tuple | None  # (inputs, targets, masks, keys), each (n_full, b, seq_len, ...) / (n_full,)
    tail: tuple | None  # (inputs, targets, mask, key) of the last, shorter segment


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
    n_segments = -(-inputs.shape[1] // seq_len)
    keys = jax.random.split(rng, n_segments) if rng is not None else None
    full_inputs, tail_inputs = _split_segments(inputs, seq_len)
    full_targets, tail_targets = _split_segments(targets, seq_len)
    full_masks, tail_mask = _split_segments(mask, seq_len) if mask is not None else (None, None)
    n_full = 0 if full_inputs is None else full_inputs.shape[0]
    full = tail = None
    if n_full:
        full = (full_inputs, full_targets, full_masks, keys[:n_full] if keys is not None else None)
    if tail_inputs is not None:
        tail = (tail_inputs, tail_targets, tail_mask, keys[-1] if keys is not None else None)
    return _Segments(full, tail)


def _segment_loss(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, ignore_index: int,
                  memory_gradients: bool = False):
    """`loss(params, memories, inputs, targets, mask, key) -> (lm + aux, (memories, lm, aux))` of one segment."""

    def loss(params, memories, inputs, targets, mask, key):
        net = nnx.merge(graphdef, params, rest)
        rngs = nnx.Rngs(dropout=key) if key is not None else None
        logits, memories, aux = net(inputs, memories, mask, rngs=rngs, memory_gradients=memory_gradients)
        lm = cross_entropy(logits, targets, ignore_index)
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

    (_, grads), lm, aux = _run_segments(body, (memories, jax.tree.map(jnp.zeros_like, params)), segments)
    return jnp.sum(lm + aux), lm, aux, grads


def _through_memory_grads(loss: Callable, params: nnx.State, memories: Memory, segments: _Segments, remat: bool):
    """`sequence_grads` with memory gradients: one value_and_grad over the whole segment scan."""
    if remat:
        loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)

    def objective(params):
        def body(memories, xs):
            _, (memories, lm, aux) = loss(params, memories, *xs)
            return memories, (lm, aux)

        _, lm, aux = _run_segments(body, memories, segments)
        return jnp.sum(lm + aux), (lm, aux)

    (total, (lm, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return total, lm, aux, grads


def _micro_split(x: jax.Array, micro_batches: int) -> jax.Array:
    # (b, ...) -> (m, b // m, ...), micro-batch j = rows j, j + m, j + 2m, ...: a strided
    # split keeps every micro-batch spread over the devices of a batch-sharded array.
    return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)


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
    batch = tokens.shape[0]
    check_int("micro_batches", micro_batches)
    if batch % micro_batches:
        raise ValueError(f"batch size ({batch}) must be divisible by micro_batches ({micro_batches})")
    if micro_batches == 1:
        return sequence_grads(model, tokens, mask, memories, rng, ignore_index=ignore_index, remat=remat,
                              memory_gradients=memory_gradients)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def micro_grads(params, tokens, mask, key):
        net = nnx.merge(graphdef, params, rest)
        return sequence_grads(net, tokens, mask, memories, key, ignore_index=ignore_index, remat=remat,
                              memory_gradients=memory_gradients)

    keys = jax.random.split(rng, micro_batches) if rng is not None else None
    micro_masks = _micro_split(mask, micro_batches) if mask is not None else None

    def accumulate(grad_sum, xs):
        micro_tokens, micro_mask, key = xs
        total, lm, aux, grads = micro_grads(params, micro_tokens, micro_mask, key)
        return jax.tree.map(jnp.add, grad_sum, grads), (total, lm, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (total, lm, aux) = jax.lax.scan(
        accumulate, zeros, (_micro_split(tokens, micro_batches), micro_masks, keys)
    )
    grads = jax.tree.map(lambda g: g / micro_batches, grad_sum)
    return jnp.mean(total), jnp.mean(lm, axis=0), jnp.mean(aux, axis=0), grads
