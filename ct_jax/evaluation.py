"""Whole-split evaluation as the paper reports it: bits per token with the memory carried through.

The split is cut into `batch_size` contiguous streams (`ct_jax.streams.evaluation_streams`);
each is run from its first token, segment by segment, its memory carried and reset at
document boundaries, so every token is predicted once, with all the context before it in
its stream and document. One compiled function runs a fixed number of segments per call
(the last call padded with empty segments), so the whole split costs one compile.

`stream_eval` returns the measures behind the number (`StreamEval`): the NLL by a token's
distance from its document's start (the paper's per-position view), each layer's attention
mass on compressed memory, memory and the segment, and, with `knockout`, all of it with the
compressed memory (or all memory) emptied before every segment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Int
from tqdm.auto import tqdm

from ct_jax._checks import check_choice, check_int
from ct_jax._host import to_device
from ct_jax.autoregressive import losses
from ct_jax.config import ModelConfig
from ct_jax.memory import KNOCKOUTS, Memory
from ct_jax.model import CompressiveTransformer
from ct_jax.streams import IGNORE_INDEX, StreamBatch, evaluation_streams

_MODE_FLAGS = ("deterministic", "use_running_average")  # the attributes `nnx.Module.eval` sets
BUCKET_NAMES = ("window", "memory", "compressed", "beyond")  # the buckets of `reach_edges`


class _Measures(NamedTuple):
    """The static options of a chunk's measures."""

    knockout: str | None
    n_buckets: int
    attention_mass: bool


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=2)
def _chunk_nll(graphdef: nnx.GraphDef, state: nnx.State, memories: Memory, batch: StreamBatch, measures: _Measures,
               buckets: Int[Array, "b s"]):
    """A chunk of segments through the training loss's forward: (summed NLL, counted targets, per bucket
    summed NLL and counted targets, per layer summed attention mass or None, final memories)."""
    result = losses(nnx.merge(graphdef, state), batch, memories, knockout=measures.knockout, per_token=True,
                    attention_mass=measures.attention_mass)
    b, length = batch.targets.shape
    token_nll = jnp.moveaxis(result.token_nll, 0, 1).reshape(b, length)  # (n, b, t) -> (b, n * t)
    counted = (batch.targets != IGNORE_INDEX).astype(jnp.int32)
    bucket_nll = jnp.zeros(measures.n_buckets, token_nll.dtype).at[buckets].add(token_nll)
    bucket_count = jnp.zeros(measures.n_buckets, jnp.int32).at[buckets].add(counted)
    mass = None if result.attention_mass is None else jnp.sum(result.attention_mass, axis=0)
    return jnp.sum(result.nll), jnp.sum(result.counts), bucket_nll, bucket_count, mass, result.memories


@dataclasses.dataclass(frozen=True)
class StreamEval:
    """What `stream_eval` measures over a split (NLL in nats)."""

    total: float  # summed NLL of the predicted tokens
    count: int  # predicted tokens
    bucket_edges: tuple[int, ...]  # a token at distance d from its document's start is in bucket searchsorted(edges, d)
    bucket_total: tuple[float, ...]  # per bucket (len(bucket_edges) + 1): summed NLL
    bucket_count: tuple[int, ...]  # per bucket: predicted tokens
    # (depth, 3) per layer: the mean attention mass on compressed memory, memory and the current
    # segment over heads and real queries (Sonnet's `export_stats`); None unless asked for
    attention_mass: np.ndarray | None = None

    @property
    def bits_per_token(self) -> float:
        """Bits per predicted token (`evaluate_stream`'s value)."""
        return self.total / max(self.count, 1) / math.log(2.0)

    @property
    def bucket_bits(self) -> tuple[float, ...]:
        """Bits per token of each bucket (nan where empty)."""
        return tuple(t / c / math.log(2.0) if c else math.nan for t, c in zip(self.bucket_total, self.bucket_count))


def reach_edges(config: ModelConfig) -> tuple[int, int, int]:
    """The model's reaches as bucket edges: its window, then plain memory, then compressed memory
    (seq_len, + mem_len, + cmem_len * cmem_ratio): tokens in window, in plain-memory reach, in
    compressed reach, beyond (`BUCKET_NAMES`)."""
    memory = config.seq_len + config.mem_len
    return config.seq_len, memory, memory + config.cmem_len * config.cmem_ratio


def document_positions(resets: np.ndarray, seq_len: int) -> np.ndarray:
    """(b, n * seq_len) each input's distance from its row's last reset (its document's start in
    `ct_jax.streams.evaluation_streams`, whose documents start at segment starts)."""
    n = resets.shape[1]
    since = np.arange(n) - np.maximum.accumulate(np.where(resets, np.arange(n), 0), axis=1)  # segments since reset
    return (since[:, :, None] * seq_len + np.arange(seq_len)).reshape(resets.shape[0], n * seq_len)


def _check_edges(bucket_edges: Sequence[int]) -> tuple[int, ...]:
    edges = tuple(bucket_edges)
    if not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in edges) or any(
            e < 1 for e in edges) or list(edges) != sorted(edges):
        raise ValueError(f"bucket_edges must be non-decreasing positive ints, got {bucket_edges!r}")
    return tuple(int(e) for e in edges)


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
    knockout: str | None = None,
) -> float:
    """Bits per token of the whole split `data` (a 1-D token array) in `batch_size` streams, memory carried.

    `document_starts`: where the split's documents begin (rows reset there; None: one
    document). `max_segments` evaluates only the first that many segments of every stream
    (a cheaper estimate, e.g. for periodic validation). `knockout` ("compressed" or "memory")
    empties that part of the memory before every segment: what the model loses without it.
    The model runs in eval mode and is left in the mode it came in. `stream_eval` gives the
    measures behind it; `ct_jax.tokenized.split_measures` turns them into bits per byte,
    perplexity and word perplexity.
    """
    return stream_eval(model, data, batch_size, document_starts=document_starts, segments_per_call=segments_per_call,
                       max_segments=max_segments, progress=progress, name=name, knockout=knockout).bits_per_token


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
    knockout: str | None = None,
) -> tuple[float, int]:
    """(summed NLL in nats, predicted tokens) of `evaluate_stream`'s evaluation (same arguments)."""
    result = stream_eval(model, data, batch_size, document_starts=document_starts, segments_per_call=segments_per_call,
                         max_segments=max_segments, progress=progress, name=name, knockout=knockout)
    return result.total, result.count


def stream_eval(
    model: CompressiveTransformer,
    data: np.ndarray,
    batch_size: int,
    *,
    document_starts: np.ndarray | None = None,
    segments_per_call: int = 32,
    max_segments: int | None = None,
    progress: bool = True,
    name: str = "validation",
    knockout: str | None = None,
    bucket_edges: Sequence[int] | None = None,
    attention_mass: bool = False,
) -> StreamEval:
    """`evaluate_stream`'s evaluation (same arguments) with its measures: the NLL by a token's distance
    from its document's start (`bucket_edges`, default the model's `reach_edges`) and, with
    `attention_mass`, each layer's mean attention mass on compressed memory, memory and the segment
    (the attention then runs its "xla" path)."""
    check_int("segments_per_call", segments_per_call)
    if max_segments is not None:
        check_int("max_segments", max_segments)
    if knockout is not None:
        check_choice("knockout", knockout, KNOCKOUTS)
    edges = _check_edges(reach_edges(model.config) if bucket_edges is None else bucket_edges)
    seq_len = model.config.seq_len
    batch = evaluation_streams(np.asarray(data), document_starts, seq_len, batch_size, name)
    n_segments = batch.resets.shape[1] if max_segments is None else min(max_segments, batch.resets.shape[1])
    per_call = min(segments_per_call, n_segments)
    n_calls = -(-n_segments // per_call)
    batch = _padded(StreamBatch(batch.inputs[:, : n_segments * seq_len], batch.targets[:, : n_segments * seq_len],
                                batch.mask[:, : n_segments * seq_len], batch.resets[:, :n_segments]),
                    n_calls * per_call, seq_len)
    buckets = np.searchsorted(np.asarray(edges), document_positions(batch.resets, seq_len), side="right"
                              ).astype(np.int32)
    measures = _Measures(knockout, len(edges) + 1, attention_mass)
    with eval_mode(model):
        graphdef, state = nnx.split(model)
    memories = Memory.empty(model, batch_size, model.dtype)
    sums = []  # read once at the end: no host sync per call
    span = per_call * seq_len
    for call in tqdm(range(n_calls), desc=f"evaluating {name}", unit="call", disable=not progress, leave=False):
        chunk = StreamBatch(*(to_device(x[:, call * span : (call + 1) * span]) for x in batch[:3]),
                            to_device(batch.resets[:, call * per_call : (call + 1) * per_call]))
        *measured, memories = _chunk_nll(graphdef, state, memories, chunk, measures,
                                         to_device(buckets[:, call * span : (call + 1) * span]))
        sums.append(measured)
    nll, count, bucket_nll, bucket_count, mass = (jax.tree.map(np.asarray, list(parts)) for parts in zip(*sums))
    queries = max(int(np.sum(batch.mask)), 1)
    return StreamEval(
        float(sum(nll)), int(sum(count)), edges, tuple(map(float, np.sum(bucket_nll, axis=0))),
        tuple(map(int, np.sum(bucket_count, axis=0))),
        np.sum(mass, axis=0) / queries if attention_mass else None,
    )
