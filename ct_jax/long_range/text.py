"""Natural text at equal training tokens: train a variant the paper's way (parallel streams
through the training documents, the memory carried across steps) and measure bits per byte
over the whole validation split with `ct_jax.evaluation.evaluate_stream` (memory carried)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from ct_jax.evaluation import evaluate_stream
from ct_jax.long_range.harness import BASE_TRAIN, SIZES
from ct_jax.long_range.variants import Variant
from ct_jax.streams import StreamSampler
from ct_jax.training import TrainConfig, Trainer, create_model


@dataclasses.dataclass
class TextResult:
    """One trained variant and seed on text: streamed validation bits per byte."""

    variant: str
    seed: int
    steps: int
    tokens: int  # training tokens seen (targets)
    bpb: float
    eval_streams: int  # validation read as this many contiguous streams
    eval_max_segments: int | None  # segments read per stream (None: the whole split)
    seconds: float


def train_text(splits: dict[str, np.ndarray], documents: dict[str, np.ndarray] | None, variant: Variant, seed: int,
               steps: int, *, seq_len: int = 16, n_segments: int = 8, eval_streams: int = 32,
               eval_max_segments: int | None = None, train_overrides: dict[str, Any] | None = None,
               compiler_options: dict[str, Any] | None = None) -> TextResult:
    """Trains `variant` (byte vocabulary) for `steps` on `batch_size` streams through
    `splits['train']`; evaluates streamed bits per byte on `splits['validation']` in
    `eval_streams` streams (all of it, or the first `eval_max_segments` segments per stream).

    `documents`: split name -> document start offsets (`ct_jax.data.read_corpus(...).starts`); the
    memory is reset at each document start. None: each split is one document.
    """
    start = time.perf_counter()
    documents = documents or {}
    model_kwargs = dict(num_tokens=256, seq_len=seq_len, **SIZES, **variant.model_kwargs())
    fields = {**BASE_TRAIN, **variant.train, **(train_overrides or {}), "data_order": "streams"}
    config = TrainConfig(n_segments=n_segments, steps=steps, seed=seed, **fields)
    model = create_model(model_kwargs, config)
    trainer = Trainer(model, config, compiler_options=compiler_options)
    state = trainer.place(trainer.init_state())
    sampler = StreamSampler(splits["train"], documents.get("train"), seq_len, n_segments, config.batch_size, seed)
    for _ in range(steps):
        state, _ = trainer.train_step(state, next(sampler))
    trained = trainer.load_params(trainer.host(state).params)
    bpb = evaluate_stream(trained, splits["validation"], eval_streams, document_starts=documents.get("validation"),
                          max_segments=eval_max_segments, progress=False)
    tokens = steps * config.batch_size * n_segments * seq_len
    return TextResult(variant.name, seed, steps, tokens, bpb, eval_streams, eval_max_segments,
                      time.perf_counter() - start)
