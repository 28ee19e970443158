"""Adaptive input (Baevski & Auli 2019) and adaptive softmax (Grave et al. 2017), as
`ct_torch_ref.adaptive` (torch's `nn.AdaptiveLogSoftmaxWithLoss` with a head bias); formulation
in docs/paper-options.md.

Cluster 0 holds the ids [0, c1), cluster i the ids [c_i, c_{i+1}), the last [c_n, num_tokens);
cluster i works at width `dim // div_val**i`. Parameter paths mirror the torch keys
(`emb_layers.{i}.embedding` <-> `emb_layers.{i}.weight`, `tail.{i}.{0,1}.kernel` <->
`tail.{i}.{0,1}.weight` transposed), so `ct_jax.convert` moves them by renaming.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from ct_jax.layers import dense, linear, wide


def check_adaptive(
    num_tokens: int, dim: int, cutoffs: Sequence[int] | None, div_val: int
) -> tuple[tuple[int, ...] | None, int]:
    """Validates adaptive_cutoffs / adaptive_div_val for a vocabulary and width; returns them normalised.

    cutoffs: strictly increasing ints in (0, num_tokens), or None (full embedding and softmax);
    div_val: an int >= 1 such that the last cluster's width dim // div_val**len(cutoffs) is >= 1.
    Same rules and messages as `ct_torch_ref.adaptive.check_adaptive` (that package imports nothing
    from ct_jax); tests/test_adaptive.py holds both to them.
    """
    if isinstance(div_val, bool) or not isinstance(div_val, int):
        raise TypeError(f"adaptive_div_val must be an int >= 1, got {div_val!r}")
    if div_val < 1:
        raise ValueError(f"adaptive_div_val must be an int >= 1, got {div_val}")
    if cutoffs is None:
        return None, div_val
    try:
        items = list(cutoffs)
        if isinstance(cutoffs, (str, bytes)) or any(isinstance(c, bool) for c in items):
            raise TypeError
        values = tuple(operator.index(c) for c in items)
    except TypeError:
        raise TypeError(
            f"adaptive_cutoffs must be a list of ints in (0, num_tokens={num_tokens}) or None, got {cutoffs!r}"
        ) from None
    if not values:
        raise ValueError("adaptive_cutoffs must hold at least one cutoff (None for the full softmax), got []")
    if any(b <= a for a, b in zip(values, values[1:])) or values[0] <= 0 or values[-1] >= num_tokens:
        raise ValueError(
            f"adaptive_cutoffs must be strictly increasing ints in (0, num_tokens={num_tokens}), got {list(values)}"
        )
    if dim // div_val ** len(values) < 1:
        raise ValueError(
            f"adaptive_div_val={div_val} with {len(values)} cutoffs leaves the last cluster width "
            f"{dim} // {div_val}**{len(values)} = 0; expected >= 1 (use a smaller adaptive_div_val or fewer cutoffs)"
        )
    return values, div_val


def cluster_bounds(num_tokens: int, cutoffs: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """((start, stop), ...) of each cluster's token ids: [0, c1), [c1, c2), ..., [c_n, num_tokens)."""
    edges = (0, *cutoffs, num_tokens)
    return tuple(zip(edges[:-1], edges[1:]))


class AdaptiveEmbedding(nnx.Module):
    """Token ids (...) -> (..., dim): cluster i embeds at width dim // div_val**i, then projects to dim.

    Paths `emb_layers.{i}.embedding` (cluster size, width) and `emb_projs.{i}.kernel` (width, dim),
    bias-free; every cluster is projected, also at full width (fairseq's AdaptiveInput).
    """

    def __init__(self, num_tokens: int, dim: int, cutoffs: Sequence[int], div_val: int = 1, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cutoffs, div_val = check_adaptive(num_tokens, dim, cutoffs, div_val)
        self.dim, self.dtype = dim, dtype
        self.bounds = cluster_bounds(num_tokens, cutoffs)
        widths = [dim // div_val**i for i in range(len(self.bounds))]
        self.emb_layers = nnx.List([
            nnx.Embed(stop - start, width, embedding_init=jax.nn.initializers.normal(1.0), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
            for (start, stop), width in zip(self.bounds, widths)
        ])
        self.emb_projs = nnx.List([
            linear(width, dim, use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for width in widths
        ])

    def __call__(self, tokens: Int[Array, "*lead"]) -> Float[Array, "*lead dim"]:
        """Each id through its own cluster's table and projection (every cluster runs on every id, masked)."""
        out = jnp.zeros((*tokens.shape, self.dim), self.dtype)
        for (start, stop), embed, project in zip(self.bounds, self.emb_layers, self.emb_projs):
            inside = (tokens >= start) & (tokens < stop)
            local = jnp.clip(tokens - start, 0, stop - start - 1)
            out = out + jnp.where(inside[..., None], project(embed(local)), 0.0)
        return out


VOCAB_CHUNK = 8192  # tail logits are built this many ids at a time: (positions, VOCAB_CHUNK) at most


def _cluster_log_prob(
    projected: Float[Array, "n w"], kernel: Float[Array, "w size"], local: Int[Array, " n"], chunk: int
) -> Float[Array, " n"]:
    """log_softmax(projected @ kernel)[local] per row, never holding more than (n, chunk) logits.

    The log-normaliser is accumulated over chunks of `chunk` ids by a scan whose body is
    rematerialised, so the backward pass too recomputes one chunk at a time; the target's logit
    is a gathered column's dot product.
    """
    size = kernel.shape[1]
    chunk = min(chunk, size)  # a cluster smaller than a chunk is one chunk, unpadded
    n_chunks = -(-size // chunk)
    padded = jnp.pad(kernel, ((0, 0), (0, n_chunks * chunk - size)))  # [w, n_chunks * chunk]
    kernel_chunks = padded.reshape(kernel.shape[0], n_chunks, chunk).transpose(1, 0, 2)  # [n_chunks, w, chunk]
    real = (jnp.arange(n_chunks * chunk) < size).reshape(n_chunks, chunk)  # [n_chunks, chunk]

    @jax.checkpoint
    def accumulate(log_norm, chunk_inputs):
        kernel_chunk, real_ids = chunk_inputs
        logits = dense(projected, kernel_chunk).astype(log_norm.dtype)  # [n, chunk]
        logits = jnp.where(real_ids[None, :], logits, -jnp.inf)
        return jnp.logaddexp(log_norm, jax.nn.logsumexp(logits, axis=-1)), None

    wide_dtype = wide(projected.dtype)
    log_norm, _ = jax.lax.scan(accumulate, jnp.full(projected.shape[:1], -jnp.inf, wide_dtype),
                               (kernel_chunks, real))
    columns = kernel[:, local]  # [w, n]
    picked = jnp.einsum("nw,wn->n", projected, columns).astype(wide_dtype)  # [n]
    return picked - log_norm


class AdaptiveLogSoftmax(nnx.Module):
    """Adaptive softmax over hidden (..., dim): a head (shortlist + one logit per tail cluster) and
    per-cluster tails; log p(id in tail i) = log p_head(cluster i) + log p_tail_i(id).

    Paths `head.{kernel,bias}` (dim, cutoffs[0] + n_clusters), `tail.{i}.0.kernel` (dim, width_i),
    `tail.{i}.1.kernel` (width_i, cluster size), width_i = dim // div_val**(i+1), as torch's
    `AdaptiveLogSoftmaxWithLoss(head_bias=True)`. `vocab_chunk` bounds the tail logits `nll` builds
    at once (a memory knob, no parameter).
    """

    def __init__(self, dim: int, num_tokens: int, cutoffs: Sequence[int], div_val: int = 1, *,
                 vocab_chunk: int = VOCAB_CHUNK, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cutoffs, div_val = check_adaptive(num_tokens, dim, cutoffs, div_val)
        if isinstance(vocab_chunk, bool) or not isinstance(vocab_chunk, int) or vocab_chunk < 1:
            raise ValueError(f"vocab_chunk must be a positive int, got {vocab_chunk!r}")
        self.num_tokens, self.cutoffs, self.vocab_chunk = num_tokens, cutoffs, vocab_chunk
        self.tail_bounds = cluster_bounds(num_tokens, cutoffs)[1:]
        opts = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.head = linear(dim, cutoffs[0] + len(cutoffs), use_bias=True, **opts)
        self.tail = nnx.List([
            nnx.List([linear(dim, dim // div_val ** (i + 1), use_bias=False, **opts),
                      linear(dim // div_val ** (i + 1), stop - start, use_bias=False, **opts)])
            for i, (start, stop) in enumerate(self.tail_bounds)
        ])

    def __call__(self, hidden: Float[Array, "*lead dim"]) -> Float[Array, "*lead vocab"]:
        """The full log-probabilities, as `log_probs` (the model's output layer for generation)."""
        return self.log_probs(hidden)

    def _head_log_probs(self, hidden: Float[Array, "*lead dim"]) -> Float[Array, "*lead head"]:
        return jax.nn.log_softmax(self.head(hidden).astype(wide(hidden.dtype)), axis=-1)

    def log_probs(self, hidden: Float[Array, "*lead dim"]) -> Float[Array, "*lead vocab"]:
        """log p(token | hidden) for every token: (..., dim) -> (..., num_tokens); builds the full tensor."""
        head = self._head_log_probs(hidden)
        shortlist = self.cutoffs[0]
        parts = [head[..., :shortlist]]
        for i, (down, up) in enumerate(self.tail):
            tail = jax.nn.log_softmax(up(down(hidden)).astype(head.dtype), axis=-1)
            parts.append(head[..., shortlist + i, None] + tail)
        return jnp.concatenate(parts, axis=-1)

    def nll(self, hidden: Float[Array, "*lead dim"], targets: Int[Array, "*lead"],
            ignore_index: int = -100) -> Float[Array, "*lead"]:
        """-log p(target | hidden) per position, 0 where targets == ignore_index, without the (..., V) tensor.

        Each tail cluster's logits are built for every position (static shapes), `vocab_chunk` ids at
        a time, also in the backward pass (`_cluster_log_prob`): the largest logits block is
        (positions, vocab_chunk), besides the head's (positions, cutoffs[0] + n_clusters). Targets
        outside [0, num_tokens) other than ignore_index are clipped (no check under jit).
        """
        lead, dim = hidden.shape[:-1], hidden.shape[-1]
        rows, ids = hidden.reshape(-1, dim), targets.reshape(-1)  # [n, dim], [n]
        head = self._head_log_probs(rows)  # [n, shortlist + n_clusters]
        shortlist = self.cutoffs[0]
        cluster = jnp.sum(ids[:, None] >= jnp.asarray(self.cutoffs)[None, :], axis=-1)  # 0 = shortlist
        head_index = jnp.where(cluster == 0, ids, shortlist + cluster - 1)
        log_prob = jnp.take_along_axis(head, jnp.clip(head_index, 0, head.shape[-1] - 1)[:, None], axis=-1)[:, 0]
        for i, ((start, stop), (down, up)) in enumerate(zip(self.tail_bounds, self.tail)):
            local = jnp.clip(ids - start, 0, stop - start - 1)
            projected = down(rows)  # [n, width_i]
            tail = _cluster_log_prob(projected, up.kernel[...].astype(projected.dtype), local, self.vocab_chunk)
            log_prob = log_prob + jnp.where(cluster == i + 1, tail, 0.0)
        return jnp.where(ids == ignore_index, 0.0, -log_prob).reshape(lead)
