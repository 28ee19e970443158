"""Building blocks around attention and feed-forward: residual/GRU gating, pre-norm,
the convolutional memory compressor and the feed-forward network (upstream 0.4.0)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .mogrifier import Mogrifier


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


class Residual(nn.Module):
    """x + fn(x); extra outputs of fn (memories, aux loss) are passed through."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, **kwargs: Any) -> tuple:
        out, *rest = _as_tuple(self.fn(x, **kwargs))
        return (out + x, *rest)


class GRUGating(nn.Module):
    """Gated residual: GRUCell(input=fn(x), hidden=x), optionally mogrified first."""

    def __init__(self, dim: int, fn: nn.Module, mogrify: bool = False):
        super().__init__()
        self.dim = dim
        self.fn = fn
        self.gru = nn.GRUCell(dim, dim)
        self.mogrify = Mogrifier(dim, factorize_k=dim // 4) if mogrify else None

    def forward(self, x: Tensor, **kwargs: Any) -> tuple:
        batch = x.shape[0]
        y, *rest = _as_tuple(self.fn(x, **kwargs))
        if self.mogrify is not None:
            y, x = self.mogrify(y, x)
        gated = self.gru(y.reshape(-1, self.dim), x.reshape(-1, self.dim))  # (b*t, d)
        return (gated.reshape(batch, -1, self.dim), *rest)


class PreNorm(nn.Module):
    """fn(LayerNorm(x)); LayerNorm eps is torch's default 1e-5."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor, **kwargs: Any) -> Any:
        return self.fn(self.norm(x), **kwargs)


class ConvCompress(nn.Module):
    """Compresses (b, n, d) memories to (b, n // ratio, d) with Conv1d(kernel = stride = ratio)."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, ratio, stride=ratio)

    def forward(self, mem: Tensor) -> Tensor:
        return self.conv(mem.transpose(1, 2)).transpose(1, 2)


class FeedForward(nn.Module):
    """Linear -> exact GELU (or GEGLU) -> dropout -> Linear, hidden width dim * mult."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, glu: bool = False):
        super().__init__()
        self.glu = glu
        self.w1 = nn.Linear(dim, dim * mult * (2 if glu else 1))
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        if self.glu:
            x, gate = self.w1(x).chunk(2, dim=-1)
            x = self.act(x) * gate
        else:
            x = self.act(self.w1(x))
        return self.w2(self.dropout(x))
