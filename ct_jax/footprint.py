"""What a training configuration needs per device, estimated before anything is allocated,
and the check that refuses a configuration that cannot fit (instead of an OOM kill).

Plain numbers in, bytes out: parameters (counted as `ct_jax.CompressiveTransformer` builds them),
Adam's two moments, gradients, and the activations one training step keeps for its backward.
Activations per segment and layer: attention scores, position logits and probabilities
(b*h*t*(t + mem + cmem) each, float32), keys/values over the memory, the stream's vectors
(norms, projections, gates) and the feed-forward's hidden layer; per segment the logits
(b*t*V, float32, with their log-softmax). Without memory gradients one segment's forward and
backward run at a time (its activations are live alone); with them every segment's stay live.
The coefficients were calibrated against `memory_analysis()` of compiled steps (tests/test_footprint.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import jax

from ct_jax._checks import check_int

GiB = float(2**30)
WIDE_BYTES = 4  # scores, softmax and logits are computed in (at least) float32
STREAM_VECTORS = 8  # per token and layer: norm in/out, q, attention out, projection, residual joins
GATE_VECTORS = 12  # per token and gated join: six gate pre-activations, reset/update/candidate, mixes
MOGRIFIER_VECTORS = 10  # per token and gated join: five alternating low-rank gatings
SCORE_TENSORS = 3  # content logits, position logits (shifted), probabilities
# The model keywords (ModelConfig's names) that `estimate` reads; callers filter a config's kwargs by them.
MODEL_KEYWORDS = ("num_tokens", "dim", "depth", "seq_len", "heads", "mem_len", "cmem_len", "cmem_ratio",
                  "memory_layers", "emb_dim", "ff_glu", "gru_gated_residual", "mogrify_gru", "compression",
                  "aux_loss", "relative_positions", "adaptive_cutoffs", "adaptive_div_val")


class Footprint(NamedTuple):
    """Estimated bytes per device of one training configuration (see the module docstring)."""

    parameters: int  # count
    parameter_bytes: int
    optimizer_bytes: int  # Adam: two moments per parameter
    gradient_bytes: int  # the gradient, and its running sum where segments or micro-batches accumulate
    activation_bytes: int  # live at the peak of one step
    logit_bytes: int  # the part of activation_bytes that the logits take

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.optimizer_bytes + self.gradient_bytes + self.activation_bytes


def _clusters(num_tokens: int, adaptive_cutoffs: Sequence[int] | None) -> list[int]:
    """Sizes of the adaptive clusters (one cluster of all tokens without cutoffs)."""
    if not adaptive_cutoffs:
        return [num_tokens]
    bounds = [0, *adaptive_cutoffs, num_tokens]
    if any(lo >= hi for lo, hi in zip(bounds, bounds[1:])):
        raise ValueError(f"adaptive_cutoffs must be increasing and below num_tokens ({num_tokens}), "
                         f"got {list(adaptive_cutoffs)}")
    return [hi - lo for lo, hi in zip(bounds, bounds[1:])]


def count_parameters(
    *, num_tokens: int, dim: int, depth: int, seq_len: int, mem_len: int | None = None, cmem_len: int | None = None,
    cmem_ratio: int = 4, heads: int = 8, emb_dim: int | None = None, ff_mult: int = 4, ff_glu: bool = False,
    gru_gated_residual: bool = True, mogrify_gru: bool = False, compression: str = "conv",
    aux_loss: str = "attention", relative_positions: str = "learned",
    adaptive_cutoffs: Sequence[int] | None = None, adaptive_div_val: int = 1,
) -> int:
    """Parameters of the model these keywords build (defaults and `None`s resolved as `ModelConfig`).

    With `adaptive_cutoffs`, adaptive input and softmax as `ct_jax.adaptive` builds them (untied,
    at emb_dim): cluster i embeds in emb_dim // adaptive_div_val**i with a bias-free projection to
    emb_dim; the softmax head (with bias) scores the first cluster plus one logit per tail cluster,
    and tail i projects emb_dim to its width (bias-free) and scores its ids from there (bias-free).
    """
    d, e = dim, emb_dim or dim
    mem_len = seq_len if mem_len is None else mem_len
    cmem_len = mem_len // cmem_ratio if cmem_len is None else cmem_len
    count = 2 * (e * d) + d + e if e != d else 0  # to_model_dim, to_emb_dim
    if adaptive_cutoffs:
        clusters = _clusters(num_tokens, adaptive_cutoffs)
        widths = [e // adaptive_div_val**i for i in range(len(clusters))]
        count += sum(size * width + width * e for size, width in zip(clusters, widths))  # emb_layers, emb_projs
        head = clusters[0] + len(clusters) - 1
        count += e * head + head  # to_logits.head
        count += sum(e * width + width * size for size, width in zip(clusters[1:], widths[1:]))  # to_logits.tail
    else:
        count += num_tokens * e + e * num_tokens + num_tokens  # token_emb, to_logits
    if relative_positions == "learned":
        count += (seq_len + mem_len + cmem_len) * d  # pos_emb (heads, pos_len, dim_head)
    attention = 4 * d * d + d  # to_q, to_kv (2 d), to_out (with bias)
    conv = cmem_ratio * d * d + d
    dilated = (cmem_ratio - 1).bit_length() * 2 * d * d  # kernel-2 layers at dilations 1, 2, 4, ... < ratio
    attention += {"conv": conv, "dilated_conv": dilated + conv}.get(compression, 0)  # pooling: none
    attention += conv if aux_loss == "autoencoder" else 0  # ConvDecompress
    attention += d * d + 2 * d if relative_positions == "sinusoidal" else 0  # to_pos, u, v
    hidden = ff_mult * d
    feed_forward = d * hidden * (2 if ff_glu else 1) + hidden * (2 if ff_glu else 1) + hidden * d + d
    join = 2 * d  # the sublayer's LayerNorm
    if gru_gated_residual:
        join += 6 * d * d + 6 * d
        if mogrify_gru:
            rank = d // 4
            join += 2 * (2 * d * rank + rank + d)
    return count + depth * (attention + feed_forward + 2 * join)


def estimate(
    *, num_tokens: int, dim: int, depth: int, seq_len: int, batch_size: int, heads: int = 8,
    mem_len: int | None = None, cmem_len: int | None = None, cmem_ratio: int = 4, ff_mult: int = 4,
    n_segments: int = 1, micro_batches: int = 1, memory_gradients: bool = False,
    memory_layers: Sequence[int] | None = None, emb_dim: int | None = None, ff_glu: bool = False,
    gru_gated_residual: bool = True, mogrify_gru: bool = False, compression: str = "conv",
    aux_loss: str = "attention", relative_positions: str = "learned",
    adaptive_cutoffs: Sequence[int] | None = None, adaptive_div_val: int = 1,
    dtype_bytes: int = 4, param_bytes: int = 4,
) -> Footprint:
    """Bytes one device needs to train with these settings; `batch_size` is the batch per device,
    `memory_layers` the layers with memory (None: all), `dtype_bytes` the compute dtype's size.
    The model keywords are `ModelConfig`'s; `MODEL_KEYWORDS` names those used here."""
    for name, value in dict(num_tokens=num_tokens, dim=dim, depth=depth, seq_len=seq_len, batch_size=batch_size,
                            heads=heads, n_segments=n_segments, micro_batches=micro_batches).items():
        check_int(name, value)
    if batch_size % micro_batches:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by micro_batches ({micro_batches})")
    mem_len = seq_len if mem_len is None else mem_len
    cmem_len = mem_len // cmem_ratio if cmem_len is None else cmem_len
    n_memory = depth if memory_layers is None else len(memory_layers)
    parameters = count_parameters(
        num_tokens=num_tokens, dim=dim, depth=depth, seq_len=seq_len, mem_len=mem_len, cmem_len=cmem_len,
        cmem_ratio=cmem_ratio, heads=heads, emb_dim=emb_dim, ff_mult=ff_mult, ff_glu=ff_glu,
        gru_gated_residual=gru_gated_residual, mogrify_gru=mogrify_gru, compression=compression, aux_loss=aux_loss,
        relative_positions=relative_positions, adaptive_cutoffs=adaptive_cutoffs, adaptive_div_val=adaptive_div_val,
    )
    b, t, d, h = batch_size // micro_batches, seq_len, dim, heads
    keys = [t + mem_len + cmem_len] * n_memory + [t] * (depth - n_memory)
    scores = sum(SCORE_TENSORS * b * h * t * k for k in keys) * WIDE_BYTES
    if aux_loss != "none" and cmem_len:  # reconstruction: attention over the memory and over the new slots
        scores += n_memory * 2 * b * h * t * (mem_len + -(-t // cmem_ratio)) * WIDE_BYTES
    key_values = sum(2 * b * k * d for k in keys) * dtype_bytes
    vectors = STREAM_VECTORS + (2 * GATE_VECTORS if gru_gated_residual else 2)
    vectors += 2 * MOGRIFIER_VECTORS if gru_gated_residual and mogrify_gru else 0
    vectors += ff_mult * (4 if ff_glu else 2)  # the hidden layer before and after its GELU (and gate)
    stream = depth * b * t * d * vectors * dtype_bytes
    clusters = _clusters(num_tokens, adaptive_cutoffs)
    # An adaptive softmax scores the head (first cluster + one logit per tail) and one tail at a time.
    scored = num_tokens if len(clusters) == 1 else clusters[0] + len(clusters) - 1 + max(clusters[1:])
    logits = 2 * b * t * scored * WIDE_BYTES
    per_segment = scores + key_values + stream + logits
    segments_live = n_segments if memory_gradients else 1
    accumulating = (n_segments > 1 and not memory_gradients) or micro_batches > 1
    return Footprint(
        parameters=parameters,
        parameter_bytes=parameters * param_bytes,
        optimizer_bytes=2 * parameters * param_bytes,
        gradient_bytes=(2 if accumulating else 1) * parameters * param_bytes,
        activation_bytes=segments_live * per_segment,
        logit_bytes=segments_live * logits,
    )


def available_memory(device: jax.Device | None = None) -> tuple[int, str]:
    """(free bytes, where) of `device` (default the first local one): its allocator's limit less what
    is in use where it reports them (GPU, TPU), else the host's available RAM shared by its local devices."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind} {device.id}"
    sharing = sum(other.platform == device.platform for other in jax.local_devices())
    return _host_available() // sharing, f"host RAM ({device.platform}, shared by {sharing} local device(s))"


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:  # MemAvailable counts reclaimable cache, unlike free pages
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class DoesNotFitError(ValueError):
    """A training configuration needs more memory than its device has."""


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f} GiB"


def describe(footprint: Footprint) -> str:
    """One line: the estimate by part."""
    return (f"{_gib(footprint.total_bytes)} per device: parameters {footprint.parameters:,} "
            f"({_gib(footprint.parameter_bytes)}), optimizer state {_gib(footprint.optimizer_bytes)}, gradients "
            f"{_gib(footprint.gradient_bytes)}, activations per step {_gib(footprint.activation_bytes)} "
            f"(logits {_gib(footprint.logit_bytes)})")


def check_fits(footprint: Footprint, available: int | None = None, *, where: str | None = None,
               headroom: float = 0.9) -> None:
    """Raises DoesNotFitError, with the estimate and what to shrink, when the estimate exceeds `headroom` of
    the `available` bytes (default: `available_memory()` of the first local device)."""
    if available is None:
        available, where = available_memory()
    if footprint.total_bytes <= headroom * available:
        return
    weights = footprint.parameter_bytes + footprint.optimizer_bytes + footprint.gradient_bytes
    other = footprint.activation_bytes - footprint.logit_bytes
    advice = sorted([
        (footprint.logit_bytes, "num_tokens or adaptive_cutoffs (the logits are batch * seq_len * vocabulary)"),
        (other, "batch_size (or raise micro_batches), seq_len, mem_len/cmem_len (activations)"),
        (weights, "dim/depth (parameters, optimizer state and gradients)"),
    ], reverse=True)
    raise DoesNotFitError(
        f"this configuration needs about {describe(footprint)}; more than {headroom:.0%} of the "
        f"{_gib(available)} free on {where or 'the device'}. Shrink, largest part first: "
        + "; ".join(f"{hint} [{_gib(size)}]" for size, hint in advice)
    )
