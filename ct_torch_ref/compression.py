"""How evicted memories become compressed slots: upstream's convolution and the paper's
alternatives (pooling, Sonnet's dilated convolution, most-used), the eviction padding and
the auto-encoding decoder. Definitions: docs/paper-options.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvCompress


def eviction_padding(n_evicted: int, ratio: int, mode: str) -> int:
    """Zeros put left of the evicted slots: upstream's `n % ratio` or the exact `-n % ratio`."""
    return n_evicted % ratio if mode == "upstream" else -n_evicted % ratio


def dilation_rates(ratio: int) -> list[int]:
    """Dilations of the kernel-2 layers of the dilated compressor: 1, 2, 4, ... below ratio."""
    rates, rate = [], 1
    while rate < ratio:
        rates.append(rate)
        rate *= 2
    return rates


def windows(padded: Tensor, ratio: int) -> Tensor:
    """(b, n, d) -> (b, n // ratio, ratio, d): the windows a stride-ratio conv reads (tail dropped)."""
    b, n, d = padded.shape
    n_out = n // ratio
    return padded[:, : n_out * ratio].reshape(b, n_out, ratio, d)


class PoolCompress(nn.Module):
    """Mean or max over each window of `ratio` slots (no parameters)."""

    def __init__(self, ratio: int, kind: str):
        super().__init__()
        self.ratio = ratio
        self.kind = kind

    def forward(self, padded: Tensor) -> Tensor:
        grouped = windows(padded, self.ratio)  # (b, n, r, d)
        return grouped.mean(dim=2) if self.kind == "mean_pool" else grouped.amax(dim=2)


class DilatedConvCompress(nn.Module):
    """Sonnet v1's dilated compressor, applied within each window of `ratio` slots.

    Kernel-2 bias-free convolutions at dilations 1, 2, 4, ... < ratio, each causally
    zero-padded inside the window and followed by ReLU, then upstream's strided Conv1d.
    """

    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.ratio = ratio
        self.dilated = nn.ModuleList(
            [nn.Conv1d(dim, dim, 2, dilation=rate, bias=False) for rate in dilation_rates(ratio)]
        )
        self.conv = nn.Conv1d(dim, dim, ratio, stride=ratio)

    def forward(self, padded: Tensor) -> Tensor:
        grouped = windows(padded, self.ratio)  # (b, n, r, d)
        b, n, r, d = grouped.shape
        hidden = grouped.reshape(b * n, r, d).transpose(1, 2)  # (b n, d, r)
        for rate, conv in zip(dilation_rates(self.ratio), self.dilated):
            hidden = F.relu(conv(F.pad(hidden, (rate, 0))))
        return self.conv(hidden).reshape(b, n, d)


class ConvDecompress(nn.Module):
    """Auto-encoding decoder: ConvTranspose1d(kernel = stride = ratio), (b, n, d) -> (b, n * ratio, d)."""

    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, ratio, stride=ratio)

    def forward(self, compressed: Tensor) -> Tensor:
        return self.conv(compressed.transpose(1, 2)).transpose(1, 2)


def make_compressor(kind: str, dim: int, ratio: int) -> nn.Module | None:
    """The compression module of an attention layer; None for "most_used" (it selects slots)."""
    if kind == "conv":
        return ConvCompress(dim, ratio)
    if kind in ("mean_pool", "max_pool"):
        return PoolCompress(ratio, kind)
    if kind == "dilated_conv":
        return DilatedConvCompress(dim, ratio)
    return None


def reads_per_slot(n_mem: int, mem_len: int, seq_len: int) -> Tensor:
    """How many full segments have read each of the n_mem held slots (this one included).

    A slot enters at one of the last seq_len places and moves seq_len places left per full
    segment, so at fixed-buffer place p it has been read (mem_len - 1 - p) // seq_len + 1 times.
    """
    place = torch.arange(mem_len - n_mem, mem_len)
    return (mem_len - 1 - place) // seq_len + 1


def select_most_used(evicted: Tensor, scores: Tensor, n_out: int) -> Tensor:
    """The n_out evicted slots (b, e, d) with the highest scores (b, e), in their original order.

    Ties go to the older (earlier) slot, so the choice is the same in every framework.
    """
    e = evicted.shape[1]
    index = torch.arange(e, device=scores.device)
    higher = scores[:, None, :] > scores[:, :, None]  # (b, i, j): slot j scores above slot i
    tie_older = (scores[:, None, :] == scores[:, :, None]) & (index[None, :] < index[:, None])[None]
    beats = higher | tie_older
    keep = beats.sum(dim=-1) < n_out  # (b, e), n_out True per row
    order = torch.where(keep, index, index + e).argsort(dim=1)[:, :n_out]  # kept, in order
    return torch.gather(evicted, 1, order[:, :, None].expand(-1, -1, evicted.shape[-1]))
