"""Transformer-XL sinusoid encodings of relative distance (the "sinusoidal" option)."""

from __future__ import annotations

import numpy as np

MAX_TIMESCALE = 10000.0


def sinusoid_table(length: int, dim: int, clamp_len: int | None = None) -> np.ndarray:
    """(length, dim) float64 [sin | cos] encodings; row i encodes distance min(length - 1 - i, clamp_len).

    Frequencies 1 / 10000^(2k / dim) as Transformer-XL; an odd dim drops the last cosine.
    A static float64 table (shapes are static here), as ct_torch_ref computes it, so both
    frameworks agree to rounding before the cast to the compute dtype. `clamp_len` is
    Transformer-XL's: distances beyond it read its encoding (None: no clamping).
    """
    inv_freq = 1.0 / (MAX_TIMESCALE ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    distances = np.arange(length - 1, -1, -1, dtype=np.float64)
    if clamp_len is not None:
        distances = np.minimum(distances, clamp_len)
    angles = distances[:, None] * inv_freq[None, :]  # (length, ceil(dim / 2))
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)[:, :dim]
