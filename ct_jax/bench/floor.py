"""The memory-bandwidth floor of decoding: bytes one new token reads over the bandwidth measured here.

A decoded token runs one row (per cached variant) through every layer, so it reads every
weight matrix once, plus the cached keys/values its attention row covers; at batch 1 that
traffic, not arithmetic, sets the time. The bandwidth is measured two ways in the same
process: a plain `jnp.sum` over a large array (what streaming can reach) and a (2, K) x (K, N)
product over as many bytes as the weights (what a decoding matmul reaches).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_jax.bench.common import interleaved
from ct_jax.model import CompressiveTransformer

GEMV_COLUMNS = 1024  # N of the (2, K) x (K, N) product; K follows from the byte count


def bytes_per_token(model: CompressiveTransformer, dtype: Any = jnp.float32) -> dict[str, int]:
    """Bytes a decoded token reads at batch 1 in `dtype`: the weights (one row of the embedding
    table, no compressor: those run once per window) and the cached K/V of each layer's attention row (memory
    and the full window's slots, every enhanced-recurrence variant: ct_jax.generation's cache)."""
    config = model.config
    itemsize = jnp.dtype(dtype).itemsize
    weights = 0
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        name = jax.tree_util.keystr(path)
        if "token_emb" in name:  # one row read
            weights += config.emb_dim
        elif "compress_mem_fn" not in name:  # the compressors run once per full window, not per token
            weights += int(np.prod(x.shape))
    variants = len(config.memory_layers) if config.enhanced_recurrence else 1
    first = min(config.memory_layers)
    cache = 0
    for layer in range(1, config.depth + 1):
        slots = config.seq_len + (config.mem_len + config.cmem_len if layer in config.memory_layers else 0)
        cache += 2 * slots * config.dim * (variants if layer >= first else 1)
    return dict(weights=weights * itemsize, cache=cache * itemsize)


def streaming_gbps(nbytes: int, reps: int = 5) -> float:
    """GB/s of a jitted `jnp.sum` over a float32 array of `nbytes` (median of `reps`)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = interleaved(dict(sum=lambda: total(x).block_until_ready()), reps, settle_s=0)["sum"].median
    return nbytes / seconds / 1e9


def gemv_gbps(nbytes: int, dtype: Any = jnp.float32, reps: int = 5) -> float:
    """GB/s of a jitted (2, K) x (K, N) product whose (K, N) operand holds `nbytes` in `dtype`."""
    dtype = jnp.dtype(dtype)
    k = max(1, nbytes // (GEMV_COLUMNS * dtype.itemsize))
    rows = jnp.ones((2, k), dtype)
    weights = jax.random.normal(jax.random.key(0), (k, GEMV_COLUMNS), dtype)
    product = jax.jit(jnp.matmul)
    seconds = interleaved(dict(gemv=lambda: product(rows, weights).block_until_ready()), reps,
                          settle_s=0)["gemv"].median
    return k * GEMV_COLUMNS * dtype.itemsize / seconds / 1e9


def floor_at_batch(floor: dict[str, float], batch: int) -> dict[str, float]:
    """`decode_floor`'s result for one decoding step of `batch` rows: the weights read once, each row's
    cache read (the bandwidths measured for batch 1 reused)."""
    total = floor["weights_bytes"] + batch * floor["cache_bytes"]
    return dict(floor, batch=batch, cache_bytes=batch * floor["cache_bytes"],
                floor_ms_sum=total / floor["sum_gbps"] / 1e6, floor_ms_gemv=total / floor["gemv_gbps"] / 1e6)


def decode_floor(model: CompressiveTransformer, dtype: Any = jnp.float32, reps: int = 5,
                 stream_bytes: int = 256 * 2**20) -> dict[str, float]:
    """Bytes per token and the floor in ms per token at the streaming and at the matmul bandwidth."""
    read = bytes_per_token(model, dtype)
    total = read["weights"] + read["cache"]
    sum_gbps = streaming_gbps(stream_bytes, reps)
    matmul_gbps = gemv_gbps(read["weights"], dtype, reps)
    return dict(weights_bytes=read["weights"], cache_bytes=read["cache"], sum_gbps=sum_gbps,
                gemv_gbps=matmul_gbps, floor_ms_sum=total / sum_gbps / 1e6, floor_ms_gemv=total / matmul_gbps / 1e6)
