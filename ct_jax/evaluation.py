"""Whole-split evaluation as the paper reports it: bits per token with the memory carried through.

The split is cut into `batch_size` contiguous streams (`ct_jax.streams.evaluation_streams`);
each is run from its first token, segment by segment, its memory carried and reset at
document boundaries, so every token is predicted once, with all the context before it in
its stream and document. One compiled function runs a fixed number of segments per call
(the last call padded with empty segments), so the whole split costs one compile.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ct_jax._checks import check_int
from ct_jax.autoregressive import losses
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer
from ct_jax.streams import IGNORE_INDEX, StreamBatch, evaluation_streams

_MODE_FLAGS = ("deterministic", "use_running_average")  # the attributes `nnx.Module.eval` sets


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _chunk_nll(graphdef: nnx.GraphDef, state: nnx.State, memories: Memory, batch: StreamBatch):
    """(summed NLL, counted targets, final memories) of a chunk of segments: the training loss's forward."""
    result = losses(nnx.merge(graphdef, state), batch, memories)
    return jnp.sum(result.nll), jnp.sum(result.counts), result.memories


@contextlib.contextmanager
def eval_mode(model: CompressiveTransformer) -> Iterator[CompressiveTransformer]:
    """`model` in eval mode inside the block; every module's own mode flags restored after it."""
    saved = [(module, {flag: getattr(module, flag) for flag in _MODE_FLAGS if hasattr(module, flag)})
             for _, module in nnx.iter_graph(model) if isinstance(module, nnx.Module)]
    model.eval()
    try:
        yield model
    finally:
        for module, flags in saved:
            for flag, value in flags.items():
                setattr(module, flag, value)


def _padded(batch: StreamBatch, n_segments: int, seq_len: int) -> StreamBatch:
    """`batch` with empty segments appended up to `n_segments` per row."""
    extra = n_segments - batch.resets.shape[1]
    tokens = ((0, 0), (0, extra * seq_len))
    return StreamBatch(np.pad(batch.inputs, tokens), np.pad(batch.targets, tokens, constant_values=IGNORE_INDEX),
                       np.pad(batch.mask, tokens), np.pad(batch.resets, ((0, 0), (0, extra))))


def evaluate_stream(
    model: CompressiveTransformer,
    data: np.ndarray,
    batch_size: int,
    *,
    document_starts: np.ndarray | None = None,
    segments_per_call: int = 32,
    max_segments: int | None = None,
    progress: bool = True,
    name: str = "validation",
) -> float:
    """Bits per token of the whole split `data` (a 1-D token array) in `batch_size` streams, memory carried.

    `document_starts`: where the split's documents begin (rows reset there; None: one
    document). `max_segments` evaluates only the first that many segments of every stream
    (a cheaper estimate, e.g. for periodic validation). The model runs in eval mode and is
    left in the mode it came in. `stream_nll` gives the summed NLL and count behind it;
    `ct_jax.tokenized.split_measures` turns it into bits per byte, perplexity and word perplexity.
    """
    total, count = stream_nll(model, data, batch_size, document_starts=document_starts,
                              segments_per_call=segments_per_call, max_segments=max_segments, progress=progress,
                              name=name)
    return total / max(count, 1) / math.log(2.0)


def stream_nll(
    model: CompressiveTransformer,
    data: np.ndarray,
    batch_size: int,
    *,
    document_starts: np.ndarray | None = None,
    segments_per_call: int = 32,
    max_segments: int | None = None,
    progress: bool = True,
    name: str = "validation",
) -> tuple[float, int]:
    """(summed NLL in nats, predicted tokens) of `evaluate_stream`'s evaluation (same arguments)."""
    check_int("segments_per_call", segments_per_call)
    if max_segments is not None:
        check_int("max_segments", max_segments)
    seq_len = model.config.seq_len
    batch = evaluation_streams(np.asarray(data), document_starts, seq_len, batch_size, name)
    n_segments = batch.resets.shape[1] if max_segments is None else min(max_segments, batch.resets.shape[1])
    per_call = min(segments_per_call, n_segments)
    n_calls = -(-n_segments // per_call)
    batch = _padded(StreamBatch(batch.inputs[:, : n_segments * seq_len], batch.targets[:, : n_segments * seq_len],
                                batch.mask[:, : n_segments * seq_len], batch.resets[:, :n_segments]),
                    n_calls * per_call, seq_len)
    with eval_mode(model):
        graphdef, state = nnx.split(model)
    memories = Memory.empty(model, batch_size, model.dtype)
    sums = []  # read once at the end: no host sync per call
    span = per_call * seq_len
    for call in tqdm(range(n_calls), desc=f"evaluating {name}", unit="call", disable=not progress, leave=False):
        chunk = StreamBatch(*(jnp.asarray(x[:, call * span : (call + 1) * span]) for x in batch[:3]),
                            jnp.asarray(batch.resets[:, call * per_call : (call + 1) * per_call]))
        nll, n, memories = _chunk_nll(graphdef, state, memories, chunk)
        sums.append((nll, n))
    total = sum(float(nll) for nll, _ in sums)
    count = sum(int(n) for _, n in sums)
    return total, count
