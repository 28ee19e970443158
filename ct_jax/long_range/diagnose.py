"""What the compressed slots keep, seen by two sets of queries (docs/long-range.md, diagnosis).

The paper's attention-reconstruction loss trains the compressor with the queries of the
segment that is running when a memory segment is evicted. Recall needs the queries of a
later segment, the one that looks for the fact. For one trained model this module measures,
at the top memory layer, how far reading the fact's segment through its compressed slots is
from reading its original memory slots, for both sets of queries:

    error(Q) = mean |attn(Q, fact slots) - attn(Q, compressed fact slots)|^2 / mean |attn(Q, fact slots)|^2

(plain softmax attention of every head over those slots alone, as the reconstruction loss
computes it). A compressor that keeps what later queries need gives a small error for both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from ct_jax import aux_losses
from ct_jax._host import to_device
from ct_jax.attention import SelfAttention
from ct_jax.long_range.tasks import RecallTask
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer


def _error(attn: SelfAttention, q: Float[Array, "b h t dh"], fact: Float[Array, "b n d"],
           compressed: Float[Array, "b c d"]) -> float:
    """The relative error of reading `compressed` instead of `fact` (layer-normed slots) with `q`."""

    def read(slots: jax.Array) -> jax.Array:  # every head's softmax over these slots alone
        k, v = attn.keys_values(slots)
        return aux_losses.full_attention(attn, q, k, v, jnp.ones(slots.shape[:2], bool), None)

    target, reconstructed = read(fact), read(compressed)
    return float(jnp.mean(jnp.square(target - reconstructed)) / jnp.mean(jnp.square(target)))


def reconstruction_errors(model: CompressiveTransformer, task: RecallTask, tokens: np.ndarray, distance: int
                          ) -> dict[str, float]:
    """{"compressing_queries": error, "recall_queries": error} at the top memory layer, over `tokens`
    (rows of `task` with their fact `distance` before the query, the fact's segment wholly
    compressed by the query's segment). The model must have one plain memory segment
    (mem_len == seq_len) and its fact must start a segment."""
    config, seq_len = model.config, task.seq_len
    if config.mem_len != seq_len or config.cmem_len == 0:
        raise ValueError(f"need mem_len == seq_len ({seq_len}) and a compressed memory, got mem_len={config.mem_len}, "
                         f"cmem_len={config.cmem_len}")
    fact_start = task.query_start(distance) - distance
    if fact_start % seq_len:
        raise ValueError(f"the fact at distance {distance} starts at {fact_start}, not at a segment start")
    fact_segment, query_segment = fact_start // seq_len, task.n_segments - 1
    if query_segment < fact_segment + 2:
        raise ValueError(f"distance {distance}: the fact's segment is not compressed before the query's segment")
    model.eval()
    try:
        return _errors(model, task, tokens, distance, fact_segment, query_segment)
    finally:
        model.train()


def _errors(model: CompressiveTransformer, task: RecallTask, tokens: np.ndarray, distance: int, fact_segment: int,
            query_segment: int) -> dict[str, float]:
    """`reconstruction_errors` after its checks, the model in eval mode."""
    config, seq_len = model.config, task.seq_len
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, x, m: nnx.merge(graphdef, state)(x, m)[1])
    memories, after = Memory.empty(model, tokens.shape[0], model.dtype), []
    for segment in range(query_segment + 1):
        memories = step(state, to_device(tokens[:, segment * seq_len : (segment + 1) * seq_len]), memories)
        after.append(memories)
    layer = config.memory_layers[-1]
    attn = model.attn_layers[layer - 1].fn
    inputs = [memories.mem[-1] for memories in after]  # per segment (b, seq_len, d): its layer-normed inputs
    n_compressed = seq_len // config.cmem_ratio
    compressed = after[fact_segment + 1].compressed_mem[-1][:, -n_compressed:]  # the fact segment's slots, just made
    fact = inputs[fact_segment]
    compressing = attn.queries(inputs[fact_segment + 1])  # the queries the reconstruction loss uses
    positions = task.target_positions(distance) - query_segment * seq_len
    recall = attn.queries(inputs[query_segment])[:, :, positions]  # the queries that look for the fact
    return {"compressing_queries": _error(attn, compressing, fact, compressed),
            "recall_queries": _error(attn, recall, fact, compressed)}
