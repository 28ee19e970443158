"""Streaming training's cost: one update with the memory carried across steps
(`data_order="streams"`, the paper's training) against one fixed-window update from empty
memory, the same model, batch and segments, both through the library's `Trainer`."""

from __future__ import annotations

from typing import Any

from ct_jax.bench.common import BenchConfig, interleaved, tokens_for
from ct_jax.streams import StreamSampler
from ct_jax.training import TrainConfig, Trainer, create_model


def _stepper(bench: BenchConfig, data_order: str, batch: Any):
    """A no-argument call that runs one update on `batch` (the state is carried between calls)."""
    config = TrainConfig(batch_size=bench.batch, n_segments=bench.segments, learning_rate=1e-4, grad_clip_norm=0.5,
                         dtype=bench.dtype, data_order=data_order, eval_every=0, checkpoint_every=0)
    trainer = Trainer(create_model(bench.model, config), config)
    state = [trainer.place(trainer.init_state())]

    def step() -> None:
        state[0], metrics = trainer.train_step(state[0], batch)
        trainer.metrics(metrics)  # waits for the update

    return step


def streaming_overhead(bench: BenchConfig, reps: int, warmup: int) -> dict[str, Any]:
    """{"windows": timing, "streams": timing, "ratio": streams / windows median}, interleaved."""
    tokens = tokens_for(bench).astype("int32")  # (batch, segments * seq_len + 1)
    sampler = StreamSampler(tokens.reshape(-1), None, bench.model["seq_len"], bench.segments, bench.batch, seed=0)
    next(sampler)  # the second batch continues every stream: no resets, the memory is carried
    calls = dict(windows=_stepper(bench, "windows", tokens), streams=_stepper(bench, "streams", next(sampler)))
    timings = interleaved(calls, reps, warmup)
    out: dict[str, Any] = {name: timing.to_json() for name, timing in timings.items()}
    out["ratio"] = timings["streams"].median / timings["windows"].median
    return out
