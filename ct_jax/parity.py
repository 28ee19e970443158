"""Cross-framework parity: run `ct_torch_ref` and `ct_jax` on the same random inputs, compare.

The home of the project's numerical tolerances: scripts/parity.py uses them, and the tests
import them (through tests/tolerances.py, which holds only the comparison helpers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_jax import convert
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer

FLOAT32_ATOL = 1e-5  # logits, memories, aux loss: max abs diff, float32, every segment and position
FLOAT64_ATOL = 1e-10  # the same in float64: semantics, not rounding
GRAD_RTOL = 1e-4  # gradients of the summed segment losses
GRAD_ATOL = 1e-6

# ct_torch_ref against upstream 0.4.0, float32 CPU. Both run the same kernels in the
# same order, so the observed difference is 0; 1e-6 leaves room for kernel changes.
TORCH_REF_VS_UPSTREAM_ATOL = 1e-6

# Gradient accumulation (tests/test_training.py): the gradient of a batch run as 2 micro-batches
# against the whole batch at once, max abs diff per parameter tensor relative to that tensor's
# largest |gradient|. Only the summation order differs: measured <= 6.0e-7 over 20 batches.
# Values after an optimizer step are compared only under SGD (linear in the gradient): Adam's
# first step is ~lr * sign(g), so a near-zero coordinate flipping sign under rounding moves by
# 2 * lr, and no tolerance below that is sound.
ACCUMULATED_GRAD_RTOL = 1e-5

# Greedy generation, logits of every draw, float32 (tests/test_generation.py). The test
# weights there are 3x larger and 40-80 calls feed each other through memory, which
# amplifies rounding: measured up to 1.04e-4, while the same runs in float64 agree to
# <= 2e-13 (rounding, not semantics).
GENERATION_LOGITS_ATOL = 5e-4

# bfloat16 forward against float32 on the same weights: max abs diff of the logits
# <= max(BF16_VS_F32_ATOL, BF16_VS_F32_SCALE_RTOL * max|float32 logits|) (tests/tolerances.bf16_atol).
# Measured with ct_torch_ref fully in bf16 (weights too) over tests/configs.py, 4 mask
# kinds x 3 seeds x 5 segments: max abs diff <= 0.102 except the Mogrifier configs, whose
# five 2*sigmoid gates scale logits up to |30| (diff 1.13, i.e. 3.7% of the max |logit|).
# bf16 has 8 significand bits (step 2**-8 ~ 3.9e-3 relative). Compute in bf16 with float32
# parameters should do better; tighten these once measured there.
BF16_VS_F32_ATOL = 0.15
BF16_VS_F32_SCALE_RTOL = 0.06

OUTPUTS = ("logits", "mem", "compressed_mem", "aux_loss")


@dataclasses.dataclass(frozen=True)
class Row:
    """One comparison: a segment, an output, its max abs diff and the bound it must meet."""

    mode: str
    segment: int
    output: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance)


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def random_inputs(num_tokens: int, seq_len: int, segments: int, batch: int, seed: int):
    """Token segments (the last one short when seq_len > 1) and right-padding masks (a fully padded row)."""
    rng = np.random.default_rng(seed)
    lengths = [seq_len] * (segments - 1) + [max(1, seq_len // 2)]
    tokens = rng.integers(0, num_tokens, (batch, sum(lengths)))
    kept = rng.integers(1, sum(lengths) + 1, batch)
    kept[0] = sum(lengths)
    mask = np.arange(sum(lengths))[None, :] < kept[:, None]
    if batch > 2:
        mask[-1] = False
    bounds = np.cumsum([0] + lengths)
    return [(tokens[:, s:e], mask[:, s:e]) for s, e in zip(bounds[:-1], bounds[1:])]


def compare(torch_model: Any, jax_model: CompressiveTransformer, *, segments: int = 4, batch: int = 3,
            seed: int = 0, modes: tuple[str, ...] = ("eval", "train")) -> list[Row]:
    """Runs both models over `segments` segments (memories threaded) in each mode; one Row per output."""
    import torch

    config = jax_model.config
    forward = nnx.jit(lambda model, tokens, memories, mask: model(tokens, memories, mask))
    rows = []
    for mode in modes:
        torch_model.train(mode == "train")
        getattr(jax_model, mode)()
        torch_memory, jax_memory = None, Memory.empty(jax_model, batch, jax_model.dtype)
        for index, (tokens, mask) in enumerate(random_inputs(config.num_tokens, config.seq_len, segments, batch, seed)):
            with torch.no_grad():
                logits, torch_memory, aux = torch_model(torch.from_numpy(tokens), memories=torch_memory,
                                                        mask=torch.from_numpy(mask))
            jax_logits, jax_memory, jax_aux = forward(jax_model, jnp.asarray(tokens), jax_memory, jnp.asarray(mask))
            valid = convert.memory_to_torch(jax_memory)
            pairs = {
                "logits": (np.asarray(jax_logits), logits.numpy()),
                "mem": (valid.mem.numpy(), torch_memory.mem.numpy()),
                "compressed_mem": (valid.compressed_mem.numpy(), torch_memory.compressed_mem.numpy()),
                "aux_loss": (np.asarray(jax_aux).reshape(()), aux.detach().numpy().reshape(())),
            }
            tolerance = FLOAT64_ATOL if jax_model.dtype == jnp.float64 else FLOAT32_ATOL
            rows += [Row(mode, index, name, _max_abs_diff(*pairs[name]), tolerance) for name in OUTPUTS]
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table: mode, segment, output, max abs diff, tolerance, verdict."""
    lines = ["| mode | segment | output | max abs diff | tolerance | verdict |", "| --- | ---: | --- | ---: | ---: | --- |"]
    for row in rows:
        verdict = "ok" if row.ok else "MISS"
        lines.append(f"| {row.mode} | {row.segment} | {row.output} | {row.max_abs_diff:.3e} | {row.tolerance:.0e} | {verdict} |")
    return "\n".join(lines)
