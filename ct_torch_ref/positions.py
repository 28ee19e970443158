"""Transformer-XL sinusoid encodings of relative distance (the "sinusoidal" option)."""

from __future__ import annotations

import torch
from torch import Tensor

MAX_TIMESCALE = 10000.0


def sinusoid_encoding(distances: Tensor, dim: int, clamp_len: int | None = None) -> Tensor:
    """(n,) distances -> (n, dim) [sin | cos] encodings, computed in float64.

    Frequencies 1 / 10000^(2k / dim) as Transformer-XL; an odd dim drops the last cosine.
    float64 makes both frameworks agree to rounding before the cast to the compute dtype.
    `clamp_len` is Transformer-XL's: distances beyond it read its encoding (None: no clamping).
    """
    if clamp_len is not None:
        distances = distances.clamp(max=clamp_len)
    inv_freq = 1.0 / (MAX_TIMESCALE ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = distances.to(torch.float64)[:, None] * inv_freq[None, :]  # (n, ceil(dim / 2))
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :dim]
