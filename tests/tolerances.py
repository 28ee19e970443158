"""Comparison helpers for tests. The tolerances themselves are stated once, in ct_jax.parity
(scripts/parity.py uses them too); they are imported here under the names the tests use."""

from __future__ import annotations

from typing import Any

import numpy as np

from ct_jax.parity import (  # noqa: F401
    ACCUMULATED_GRAD_RTOL,
    BF16_VS_F32_ATOL,
    BF16_VS_F32_SCALE_RTOL,
    FLOAT32_ATOL,
    FLOAT64_ATOL,
    GENERATION_LOGITS_ATOL,
    GRAD_ATOL,
    GRAD_RTOL,
    TORCH_REF_VS_UPSTREAM_ATOL,
)

JAX_VS_TORCH_ATOL = FLOAT32_ATOL  # ct_jax against the reference, float32 forward over 4+ segments
JAX_VS_TORCH_F64_ATOL = FLOAT64_ATOL  # the same in float64


def bf16_atol(float32_reference: Any) -> float:
    """The absolute bound for a bfloat16 result against its float32 reference (bounds: ct_jax.parity)."""
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
