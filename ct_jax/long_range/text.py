"""Natural text at equal training tokens: train a variant on random windows of a byte corpus
and measure bits per byte on a validation stream read in order, the memory carried throughout."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_jax.autoregressive import segment_losses
from ct_jax.data import WindowSampler
from ct_jax.long_range.harness import BASE_TRAIN, SIZES
from ct_jax.long_range.variants import Variant
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer
from ct_jax.training import TrainConfig, Trainer, create_model


@dataclasses.dataclass
class TextResult:
    """One trained variant and seed on text: streamed validation bits per byte."""

    variant: str
    seed: int
    steps: int
    tokens: int  # training tokens seen (targets)
    bpb: float
    seconds: float


def stream_bpb_fn(model: CompressiveTransformer, compiler_options: dict[str, Any] | None = None) -> Callable:
    """A jitted `(params, tokens (b, n * seq_len + 1), memories) -> (sum of per-segment mean NLLs, memories)`."""
    model.eval()
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    model.train()

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def chunk(params: nnx.State, tokens: jax.Array, memories: Memory):
        lm, _, memories = segment_losses(nnx.merge(graphdef, params, rest), tokens, memories=memories)
        return jnp.sum(lm), memories

    return chunk


def stream_bpb(model: CompressiveTransformer, params: nnx.State, data: np.ndarray, streams: int,
               segments_per_call: int = 8, compiler_options: dict[str, Any] | None = None) -> float:
    """Bits per byte over the first `streams * L` bytes of `data`, cut into `streams` contiguous
    streams each read start to end with the memory carried across segments (no window restarts)."""
    seq_len = model.config.seq_len
    call = segments_per_call * seq_len
    calls = (len(data) - 1) // streams // call
    if calls < 1:
        raise ValueError(f"data ({len(data)} bytes) must hold {streams} streams of at least {call + 1} bytes")
    length = calls * call
    rows = np.stack([np.asarray(data[i * length : i * length + length + 1], np.int32) for i in range(streams)])
    chunk = stream_bpb_fn(model, compiler_options)
    memories, total = Memory.empty(model, streams, model.dtype), 0.0
    for c in range(calls):
        nll, memories = chunk(params, jnp.asarray(rows[:, c * call : (c + 1) * call + 1]), memories)
        total += float(nll)
    return total / (calls * segments_per_call) / math.log(2.0)


def train_text(splits: dict[str, np.ndarray], variant: Variant, seed: int, steps: int, *, seq_len: int = 16,
               n_segments: int = 8, eval_streams: int = 8, eval_bytes: int = 65_536,
               train_overrides: dict[str, Any] | None = None, compiler_options: dict[str, Any] | None = None
               ) -> TextResult:
    """Trains `variant` (byte vocabulary) for `steps` on random windows of `splits['train']`;
    evaluates streamed bits per byte on the first `eval_bytes` of `splits['validation']`."""
    start = time.perf_counter()
    model_kwargs = dict(num_tokens=256, seq_len=seq_len, **SIZES, **variant.model_kwargs())
    fields = {**BASE_TRAIN, **variant.train, **(train_overrides or {})}
    config = TrainConfig(n_segments=n_segments, steps=steps, seed=seed, **fields)
    model = create_model(model_kwargs, config)
    trainer = Trainer(model, config, compiler_options=compiler_options)
    state = trainer.place(trainer.init_state())
    sampler = WindowSampler(splits["train"], trainer.window, config.batch_size, seed)
    for _ in range(steps):
        state, _ = trainer.train_step(state, next(sampler))
    params = trainer.host(state).params
    bpb = stream_bpb(model, params, splits["validation"][: eval_bytes + 1], eval_streams,
                     compiler_options=compiler_options)
    tokens = steps * config.batch_size * (trainer.window - 1)
    return TextResult(variant.name, seed, steps, tokens, bpb, time.perf_counter() - start)
