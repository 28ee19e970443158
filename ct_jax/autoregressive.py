"""Language-model losses over many segments: one `lax.scan`, the memory as its carry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

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


def segment_losses(
    model: CompressiveTransformer,
    tokens: Int[Array, "b l"],
    mask: Bool[Array, "b l"] | None = None,
    memories: Memory | None = None,
    rng: jax.Array | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    unroll: int = 1,
    remat: bool = False,
) -> tuple[Float[Array, " n"], Float[Array, " n"], Memory]:
    """Per-segment LM and aux losses of `tokens` (b, n*seq_len + 1), as upstream's wrapper yields.

    Inputs/targets are shifted by one and split into seq_len segments (a shorter last one
    is allowed); a `lax.scan` runs the full segments with the memory as carry (returned
    memories are stop-gradient, as the reference detaches), so compile time does not grow
    with n. `mask` may cover the inputs (l - 1) or the whole sequence (l; its last entry is
    dropped, as upstream). `rng` seeds dropout, one key per segment. Returns
    `(lm_losses[n], aux_losses[n], final_memories)`.
    """
    config = model.config
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape (batch, n * seq_len + 1) with length >= 2, got {tokens.shape}")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if mask is not None:
        if mask.shape == tokens.shape:
            mask = mask[:, :-1]
        if mask.shape != inputs.shape:
            raise ValueError(f"mask must have shape {tokens.shape} or {inputs.shape}, got {mask.shape}")
    batch = tokens.shape[0]
    if memories is None:
        memories = Memory.empty(model, batch, model.dtype)
    n_segments = -(-inputs.shape[1] // config.seq_len)
    keys = jax.random.split(rng, n_segments) if rng is not None else None

    graphdef, state = nnx.split(model)

    def run_segment(memories, segment, target, segment_mask, key):
        net = nnx.merge(graphdef, state)
        rngs = nnx.Rngs(dropout=key) if key is not None else None
        logits, memories, aux = net(segment, memories, segment_mask, rngs=rngs)
        return memories, (cross_entropy(logits, target, ignore_index), aux)

    def body(memories, xs):
        segment, target, segment_mask, key = xs
        return run_segment(memories, segment, target, segment_mask, key)

    if remat:
        body = jax.checkpoint(body)

    full_inputs, tail_inputs = _split_segments(inputs, config.seq_len)
    full_targets, tail_targets = _split_segments(targets, config.seq_len)
    full_masks, tail_mask = _split_segments(mask, config.seq_len) if mask is not None else (None, None)
    n_full = 0 if full_inputs is None else full_inputs.shape[0]
    lm_losses, aux_losses = [], []
    if n_full:
        full_keys = keys[:n_full] if keys is not None else None
        memories, (lm, aux) = jax.lax.scan(
            body, memories, (full_inputs, full_targets, full_masks, full_keys), unroll=unroll
        )
        lm_losses.append(lm)
        aux_losses.append(aux)
    if tail_inputs is not None:
        tail_key = keys[-1] if keys is not None else None
        memories, (lm, aux) = run_segment(memories, tail_inputs, tail_targets, tail_mask, tail_key)
        lm_losses.append(lm[None])
        aux_losses.append(aux[None])
    return jnp.concatenate(lm_losses), jnp.concatenate(aux_losses), memories


def lm_objective(
    model: CompressiveTransformer,
    tokens: Int[Array, "b l"],
    mask: Bool[Array, "b l"] | None = None,
    memories: Memory | None = None,
    rng: jax.Array | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    remat: bool = False,
) -> tuple[Float[Array, ""], tuple[Float[Array, " n"], Float[Array, " n"]]]:
    """The training objective `sum_segments(lm + aux)` and the per-segment `(lm, aux)` losses.

    Its gradient is the one the reference accumulates with one `(loss + aux_loss).backward()`
    per segment (the carried memory is stop-gradient, so the per-segment graphs are disjoint).
    """
    lm, aux, _ = segment_losses(model, tokens, mask, memories, rng, ignore_index=ignore_index, remat=remat)
    return jnp.sum(lm + aux), (lm, aux)


def _micro_split(x: jax.Array, micro_batches: int) -> jax.Array:
    # (b, ...) -> (m, b // m, ...), micro-batch j = rows j, j + m, j + 2m, ...: a strided
    # split keeps every micro-batch spread over the devices of a batch-sharded array.
    return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)


def accumulated_grads(
    model: CompressiveTransformer,
    tokens: Int[Array, "b l"],
    mask: Bool[Array, "b l"] | None = None,
    rng: jax.Array | None = None,
    *,
    micro_batches: int = 1,
    memories: Memory | None = None,
    ignore_index: int = IGNORE_INDEX,
    remat: bool = False,
) -> tuple[Float[Array, ""], Float[Array, " n"], Float[Array, " n"], nnx.State]:
    """`lm_objective` and its gradient w.r.t. the model's `nnx.Param`s, averaged over micro-batches.

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
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
    if batch % micro_batches:
        raise ValueError(f"batch size ({batch}) must be divisible by micro_batches ({micro_batches})")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def objective(params, tokens, mask, key):
        net = nnx.merge(graphdef, params, rest)
        return lm_objective(net, tokens, mask, memories, key, ignore_index=ignore_index, remat=remat)

    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    if micro_batches == 1:
        (total, (lm, aux)), grads = value_and_grad(params, tokens, mask, rng)
        return total, lm, aux, grads

    keys = jax.random.split(rng, micro_batches) if rng is not None else None
    micro_masks = _micro_split(mask, micro_batches) if mask is not None else None

    def accumulate(grad_sum, xs):
        micro_tokens, micro_mask, key = xs
        (total, (lm, aux)), grads = value_and_grad(params, micro_tokens, micro_mask, key)
        return jax.tree.map(jnp.add, grad_sum, grads), (total, lm, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (total, lm, aux) = jax.lax.scan(
        accumulate, zeros, (_micro_split(tokens, micro_batches), micro_masks, keys)
    )
    grads = jax.tree.map(lambda g: g / micro_batches, grad_sum)
    return jnp.mean(total), jnp.mean(lm, axis=0), jnp.mean(aux, axis=0), grads
