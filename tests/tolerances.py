"""The one place for the project's numerical tolerances, and the comparison helper."""

from __future__ import annotations

from typing import Any

import numpy as np

from ct_jax.parity import FLOAT32_ATOL, FLOAT64_ATOL, GRAD_ATOL, GRAD_RTOL  # noqa: F401

# ct_torch_ref against upstream 0.4.0, float32 CPU. Both run the same kernels in the
# same order, so the observed difference is 0; 1e-6 leaves room for kernel changes.
TORCH_REF_VS_UPSTREAM_ATOL = 1e-6

# ct_jax against the reference: float32 forward (logits, memories, aux loss) over 4+
# segments, float64 likewise, and gradients of the summed segment losses. Stated once, in
# ct_jax.parity, which scripts/parity.py uses too.
JAX_VS_TORCH_ATOL = FLOAT32_ATOL
JAX_VS_TORCH_F64_ATOL = FLOAT64_ATOL

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
# <= max(BF16_VS_F32_ATOL, BF16_VS_F32_SCALE_RTOL * max|float32 logits|) (bf16_atol below).
# Measured with ct_torch_ref fully in bf16 (weights too) over tests/configs.py, 4 mask
# kinds x 3 seeds x 5 segments: max abs diff <= 0.102 except the Mogrifier configs, whose
# five 2*sigmoid gates scale logits up to |30| (diff 1.13, i.e. 3.7% of the max |logit|).
# bf16 has 8 significand bits (step 2**-8 ~ 3.9e-3 relative). Compute in bf16 with float32
# parameters should do better; tighten these once measured there.
BF16_VS_F32_ATOL = 0.15
BF16_VS_F32_SCALE_RTOL = 0.06


def bf16_atol(float32_reference: Any) -> float:
    """The absolute bound for a bfloat16 result against its float32 reference (see above)."""
    reference = _to_numpy(float32_reference).astype(np.float64)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return max(BF16_VS_F32_ATOL, BF16_VS_F32_SCALE_RTOL * scale)


def _to_numpy(value: Any) -> np.ndarray:
    """torch / jax / numpy / Python scalar -> numpy array (torch bfloat16 via float32)."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        # numpy has no bfloat16: widen it; every other dtype (float64 too) is kept
        return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    return np.asarray(value)


def assert_close(name: str, got: Any, expected: Any, atol: float, rtol: float = 0.0) -> None:
    """Raises AssertionError unless |got - expected| <= atol + rtol * |expected| everywhere.

    The message names `name` and gives the shapes, the max abs difference, where it is,
    the two values there, and how many elements are out of tolerance. NaN matches only NaN.
    """
    got_np, expected_np = _to_numpy(got), _to_numpy(expected)
    if got_np.shape != expected_np.shape:
        raise AssertionError(f"{name}: shape {got_np.shape} != expected {expected_np.shape}")
    if got_np.size == 0:
        return
    got_f, expected_f = got_np.astype(np.float64), expected_np.astype(np.float64)
    both_nan = np.isnan(got_f) & np.isnan(expected_f)
    diff = np.where(both_nan, 0.0, np.abs(got_f - expected_f))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only, or inf - inf
    allowed = atol + rtol * np.abs(expected_f)
    bad = diff > allowed
    if bad.any():
        where = np.unravel_index(np.argmax(diff), diff.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {diff.size} elements differ by more than "
            f"atol={atol:g} + rtol={rtol:g}*|expected|; max abs diff {diff[where]:.3e} at "
            f"index {tuple(int(i) for i in where)} (got {float(got_f[where])!r}, expected "
            f"{float(expected_f[where])!r}); shape {got_np.shape}"
        )
