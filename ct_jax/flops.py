"""Analytic FLOP count of the Compressive Transformer, per component, for MFU figures.

Only matrix products are counted (2 * m * n * k each); norms, softmax, gates'
nonlinearities, the loss and the optimizer update are left out, as is usual for MFU.
An adaptive model's embedding tables are lookups; its cluster projections and its softmax's
head and tails are counted at every position, as ct_jax computes them (`adaptive_output_size`).
The count is of the model's work as the reference does it: keys and values over the
memory slots that are valid at each segment (the reference's memory grows from empty;
ct_jax computes over fixed-size buffers, so it executes more than it is credited with
on the first segments), and relative-position logits over the `cmem | mem | x` keys.

Backward = 2 x forward (input and weight gradients) for every product on the LM path.
Exceptions, where gradients stop (the aux path):
- memory compression: the evicted slots are stop-gradient, only the weight gradient (1x);
- reconstruction K/V of the new slots: stop-gradient weight, only the input gradient (1x);
- reconstruction target (attention over the current memory): all stop-gradient (0x);
- reconstruction attention over the new slots: the scores need dK (1x), the weighted sum
  needs d(weights) and dV (2x), so 1.5x on average.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ct_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Flops:
    """Forward and backward FLOPs of one component."""

    forward: float = 0.0
    backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)


COMPONENTS = (
    "embedding projections",
    "attention projections",
    "attention scores and values",
    "relative positions",
    "gated residuals",
    "mogrifier",
    "feed-forward",
    "logits",
    "memory compression",
    "reconstruction loss",
)


def memory_schedule(config: ModelConfig, segments: int) -> list[tuple[int, int, int]]:
    """(valid mem, valid cmem, slots compressed) per full segment, as the reference grows them."""
    t, ratio = config.seq_len, config.cmem_ratio
    mem = cmem = 0
    schedule = []
    for _ in range(segments):
        evicted = max(mem + t - config.mem_len, 0)
        padded = evicted + evicted % ratio  # upstream's padding amount (see ct_jax.memory)
        compressed = padded // ratio if config.cmem_len > 0 else 0
        schedule.append((mem, cmem, compressed))
        mem, cmem = min(mem + t, config.mem_len), min(cmem + compressed, config.cmem_len)
    return schedule


def adaptive_widths(config: ModelConfig) -> list[int]:
    """Widths of the adaptive clusters, `emb_dim // adaptive_div_val**i` (ct_jax.adaptive)."""
    return [config.emb_dim // config.adaptive_div_val**i for i in range(len(config.adaptive_cutoffs) + 1)]


def adaptive_output_size(config: ModelConfig) -> float:
    """The adaptive softmax's products per position, in units of emb_dim: the head (shortlist + one
    logit per tail cluster), each tail's down-projection and its logits at that width. ct_jax runs
    every cluster at every position (static shapes); the reference only where the target lies."""
    e, cutoffs = config.emb_dim, config.adaptive_cutoffs
    sizes = [stop - start for start, stop in zip(cutoffs, (*cutoffs[1:], config.num_tokens))]
    tails = sum(width * (e + size) for width, size in zip(adaptive_widths(config)[1:], sizes))
    return cutoffs[0] + len(cutoffs) + tails / e


def segment_flops(
    config: ModelConfig, batch: int, mem: int, cmem: int, compressed: int, *, training: bool
) -> dict[str, Flops]:
    """FLOPs of one full segment with `mem`/`cmem` valid memory slots, per component.

    `training` adds the backward pass and the reconstruction (aux) loss, which the model
    computes only in training mode.
    """
    b, t, d, e, h = batch, config.seq_len, config.dim, config.emb_dim, config.heads
    dh, n_layers = config.dim_head, config.depth
    n_mem_layers = len(config.memory_layers)
    tokens = b * t
    grad = 2.0 if training else 0.0  # backward / forward on the LM path

    def lm(forward: float) -> Flops:
        return Flops(forward, grad * forward)

    def attention_keys(memory_layer: bool) -> int:
        return t + (mem + cmem if memory_layer else 0)

    layers = [index + 1 in config.memory_layers for index in range(n_layers)]
    kv_rows = sum(b * attention_keys(m) for m in layers)
    key_pairs = sum(b * h * t * attention_keys(m) for m in layers)  # (query, key) pairs over heads
    flops = dict.fromkeys(COMPONENTS, Flops())
    if e != d:
        flops["embedding projections"] = lm(2 * tokens * e * d * 2)  # to_model_dim, to_logits.0
    flops["attention projections"] = lm(n_layers * 2 * tokens * d * d * 2 + 2 * kv_rows * d * 2 * d)  # q, out; kv
    flops["attention scores and values"] = lm(2 * key_pairs * dh * 2)  # q.k and weights.v
    flops["relative positions"] = lm(2 * key_pairs * dh)  # q.P over one row per key
    if config.gru_gated_residual:
        flops["gated residuals"] = lm(n_layers * 2 * 2 * (2 * tokens * d * 3 * d))  # 2 gates x (input, hidden)
        if config.mogrify_gru:
            rank = d // 4
            flops["mogrifier"] = lm(n_layers * 2 * 5 * 2 * (2 * tokens * d * rank))  # 5 steps of low rank
    hidden = 4 * d
    flops["feed-forward"] = lm(n_layers * 2 * tokens * d * hidden * (3 if config.ff_glu else 2))
    if config.adaptive:
        flops["embedding projections"] += lm(2 * tokens * e * sum(adaptive_widths(config)))  # emb_projs
        flops["logits"] = lm(2 * tokens * e * adaptive_output_size(config))
    else:
        flops["logits"] = lm(2 * tokens * e * config.num_tokens)
    if compressed:
        conv = n_mem_layers * 2 * b * compressed * config.cmem_ratio * d * d
        flops["memory compression"] = Flops(conv, conv if training else 0.0)
        if training:
            kv = 2 * b * compressed * d * 2 * d
            target = 2 * b * h * t * mem * dh * 2
            recon = 2 * b * h * t * compressed * dh * 2
            flops["reconstruction loss"] = Flops(
                n_mem_layers * (kv + target + recon), n_mem_layers * (kv + 1.5 * recon)
            )
    return flops


def run_flops(model_kwargs: Mapping[str, Any], batch: int, segments: int, *, training: bool) -> dict[str, Flops]:
    """FLOPs of `segments` full segments from empty memory (a training step or an eval pass)."""
    config = ModelConfig.from_kwargs(dict(model_kwargs))
    totals = dict.fromkeys(COMPONENTS, Flops())
    for mem, cmem, compressed in memory_schedule(config, segments):
        for name, value in segment_flops(config, batch, mem, cmem, compressed, training=training).items():
            totals[name] = totals[name] + value
    return totals


def total_flops(model_kwargs: Mapping[str, Any], batch: int, segments: int, *, training: bool) -> float:
    """Sum of `run_flops` over components, forward and backward."""
    return sum(f.total for f in run_flops(model_kwargs, batch, segments, training=training).values())
