"""Cross-framework parity: run `ct_torch_ref` and `ct_jax` on the same random inputs, compare.

The home of the project's numerical tolerances: scripts/parity.py uses them, and the tests
import them (through tests/tolerances.py, which holds only the comparison helpers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_jax import convert
from ct_jax._host import to_device
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer

if TYPE_CHECKING:  # torch is an optional dependency: imported where it is used
    import torch

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

# bfloat16 decoding (`generate(..., dtype=jnp.bfloat16)`: weights, activations, memory and
# cache in bf16) against float32 decoding of the same model, greedy: the logits of every draw
# up to the first token where the two samples part, max abs diff <=
# max(BF16_DECODE_LOGITS_ATOL, BF16_DECODE_SCALE_RTOL * max|float32 logits|). Measured on
# tests/configs.py weights (randomize_), 4-5 configs x 2 primes x 10 windows: <= 0.023 abs,
# <= 1.7% of the max |logit| (0.36-1.7); with weight matrices 3x larger (tests/test_generation's
# WEIGHT_GAIN, |logits| up to 15) up to 0.73 abs, 6.7% of the max |logit|. Rounding feeds back
# through the memory and the sampled tokens, so the samples part after a while (measured: 4 to
# all 80 greedy tokens agree); only float32 decoding is exact.
BF16_DECODE_LOGITS_ATOL = 0.05
BF16_DECODE_SCALE_RTOL = 0.03

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


# None: no mask. "right"/"left": rows padded at the end/start of the whole sequence (so
# some segments hold fully padded rows). "padded_row": row 1 fully padded everywhere.
MASK_KINDS: tuple[str | None, ...] = (None, "right", "left", "padded_row")


def segment_lengths(seq_len: int, n_segments: int) -> list[int]:
    """n_segments - 1 full segments of seq_len, then a short one (seq_len // 2, >= 1)."""
    return [seq_len] * (n_segments - 1) + [max(1, seq_len // 2)]


def make_inputs(config: Mapping[str, Any], batch: int = 3, n_segments: int = 5, seed: int = 0,
                mask_kind: str | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Random token segments (int64, (batch, t)) and their masks (bool, True = real token).

    `config` needs num_tokens and seq_len. The last segment is short (t < seq_len whenever
    seq_len > 1). Masks are None for mask_kind None; otherwise one mask per segment, cut
    from a whole-sequence mask in which row 0 is never padded.
    """
    import torch

    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    if mask_kind is not None and batch < 2:
        raise ValueError(f"masks need batch >= 2 (one unpadded row), got batch={batch}")
    generator = torch.Generator().manual_seed(seed)
    lengths = segment_lengths(config["seq_len"], n_segments)
    total = sum(lengths)
    tokens = torch.randint(0, config["num_tokens"], (batch, total), generator=generator)
    segments = list(tokens.split(lengths, dim=1))
    if mask_kind is None:
        return segments, [None] * n_segments

    positions = torch.arange(total)
    # Row 0 is never padded; the others keep between one token and all but one.
    kept = torch.randint(1, total, (batch,), generator=generator)
    kept[0] = total
    if mask_kind == "right":
        mask = positions[None, :] < kept[:, None]
    elif mask_kind == "left":
        mask = positions[None, :] >= (total - kept)[:, None]
    else:  # "padded_row"
        mask = torch.ones(batch, total, dtype=torch.bool)
        mask[1] = False
    return segments, list(mask.split(lengths, dim=1))


JaxCall = Callable[[jax.Array, Memory | None, jax.Array | None], tuple[jax.Array, Memory, jax.Array]]


def run_both(torch_model: Any, call: JaxCall, segments: list[Any], masks: list[Any],
             memories: Memory | None = None) -> Iterator[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Runs the torch model and `call(tokens, memories, mask)` over the segments, each threading
    its memory; yields per segment {output: (JAX value, torch value)} for the OUTPUTS."""
    import torch

    torch_memory, jax_memory = None, memories
    for tokens, mask in zip(segments, masks):
        with torch.no_grad():
            logits, torch_memory, aux = torch_model(tokens, memories=torch_memory, mask=mask)
        jax_mask = None if mask is None else to_device(mask.numpy())
        jax_logits, jax_memory, jax_aux = call(to_device(tokens.numpy()), jax_memory, jax_mask)
        valid = convert.memory_to_torch(jax_memory)
        yield {
            "logits": (np.asarray(jax_logits), logits.numpy()),
            "mem": (valid.mem.numpy(), torch_memory.mem.numpy()),
            "compressed_mem": (valid.compressed_mem.numpy(), torch_memory.compressed_mem.numpy()),
            "aux_loss": (np.asarray(jax_aux), aux.detach().numpy().reshape(())),
        }


def compare(torch_model: Any, jax_model: CompressiveTransformer, *, segments: int = 4, batch: int = 3,
            seed: int = 0, modes: tuple[str, ...] = ("eval", "train"), mask_kind: str | None = "right") -> list[Row]:
    """Runs both models over `segments` segments (memories threaded) in each mode; one Row per output."""
    config = jax_model.config
    forward = nnx.jit(lambda model, tokens, memories, mask: model(tokens, memories, mask))
    tolerance = FLOAT64_ATOL if jax_model.dtype == jnp.float64 else FLOAT32_ATOL
    mask_kind = mask_kind if batch >= 2 else None  # a mask needs one unpadded row besides the padded ones
    inputs = make_inputs(dict(num_tokens=config.num_tokens, seq_len=config.seq_len), batch, segments, seed, mask_kind)
    rows = []
    for mode in modes:
        torch_model.train(mode == "train")
        getattr(jax_model, mode)()
        empty = Memory.empty(jax_model, batch, jax_model.dtype)
        outputs = run_both(torch_model, lambda *args: forward(jax_model, *args), *inputs, memories=empty)
        for index, pairs in enumerate(outputs):
            pairs["aux_loss"] = (pairs["aux_loss"][0].reshape(()), pairs["aux_loss"][1])
            rows += [Row(mode, index, name, _max_abs_diff(*pairs[name]), tolerance) for name in OUTPUTS]
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table: mode, segment, output, max abs diff, tolerance, verdict."""
    lines = ["| mode | segment | output | max abs diff | tolerance | verdict |",
             "| --- | ---: | --- | ---: | ---: | --- |"]
    for row in rows:
        verdict = "ok" if row.ok else "MISS"
        lines.append(f"| {row.mode} | {row.segment} | {row.output} | {row.max_abs_diff:.3e} | {row.tolerance:.0e} "
                     f"| {verdict} |")
    return "\n".join(lines)
