"""Self-attention over compressed memory | memory | segment, with the memory update and
the auxiliary reconstruction loss of upstream 0.4.0."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import ConvCompress

Memory = namedtuple("Memory", ["mem", "compressed_mem"])


def relative_shift(pos_dots: Tensor) -> Tensor:
    """Transformer-XL relative shift of (..., i, j) query/position logits (upstream `shift`).

    Entry (r, c) of the result is input column c + i - 1 - r: query r (at position
    j - i + r) and key c, at distance d = j - i + r - c, read position row j - 1 - d.
    Entries with d < 0 (future keys, masked later) read 0.
    """
    *lead, i, j = pos_dots.shape
    zero_pad = torch.zeros((*lead, i, i), dtype=pos_dots.dtype, device=pos_dots.device)
    x = torch.cat([pos_dots, zero_pad], -1)
    width = i + j - 1
    x = x.view(*lead, -1)
    zero_pad = torch.zeros(*lead, -x.size(-1) % width, dtype=x.dtype, device=x.device)
    shifted = torch.cat([x, zero_pad], -1).view(*lead, -1, width)
    return shifted[..., :i, i - 1 :]


def full_attn(
    q: Tensor, k: Tensor, v: Tensor, dropout_fn: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Unmasked softmax attention, (b, h, i, d) x (b, h, j, d) -> (b, h, i, d)."""
    dots = torch.einsum("bhid,bhjd->bhij", q, k) * (q.shape[-1] ** -0.5)
    attn = dots.softmax(dim=-1)
    if dropout_fn is not None:
        attn = dropout_fn(attn)
    return torch.einsum("bhij,bhjd->bhid", attn, v)


class SelfAttention(nn.Module):
    """Multi-head attention of a segment over [compressed memory | memory | segment]."""

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mem_len: int,
        cmem_len: int,
        cmem_ratio: int = 4,
        heads: int = 8,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        reconstruction_attn_dropout: float = 0.0,
    ):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.dim_head = dim // heads
        self.seq_len = seq_len
        self.mem_len = mem_len
        self.cmem_len = cmem_len
        self.cmem_ratio = cmem_ratio
        self.scale = self.dim_head ** (-0.5)

        # Creation order as upstream, so that a seeded init draws the same numbers.
        self.compress_mem_fn = ConvCompress(dim, cmem_ratio)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, dim * 2, bias=False)
        self.to_out = nn.Linear(dim, dim)

        self.attn_dropout = nn.Dropout(attn_dropout)
        self.dropout = nn.Dropout(dropout)
        self.reconstruction_attn_dropout = nn.Dropout(reconstruction_attn_dropout)

    def _split_heads(self, t: Tensor) -> Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    def forward(
        self,
        x: Tensor,
        memories: tuple[Tensor, Tensor] | None = None,
        pos_emb: Tensor | None = None,
        input_mask: Tensor | None = None,
        calc_memory: bool = True,
    ) -> tuple[Tensor, Memory, Tensor]:
        """x (b, t, d) layer-normed; memories (mem (b, m, d), cmem (b, c, d)) or None;
        pos_emb (h, >= c+m+t, dh); input_mask (b, t) bool.
        Returns (out (b, t, d), Memory(new mem, new cmem), aux loss 0-d)."""
        b, t, e = x.shape
        mem, cmem = memories if memories is not None else (None, None)
        mem = x.new_empty(b, 0, e) if mem is None else mem
        cmem = x.new_empty(b, 0, e) if cmem is None else cmem
        n_mem, n_cmem = mem.shape[1], cmem.shape[1]

        q = self.to_q(x)
        kv_input = torch.cat((cmem, mem, x), dim=1)  # (b, c+m+t, d)
        kv_len = kv_input.shape[1]
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        q, k, v = map(self._split_heads, (q, k, v))

        dots = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        # Finite -finfo.max (not -inf): a fully masked row becomes uniform, not NaN.
        # Kept for parity with upstream 0.4.0.
        mask_value = -torch.finfo(dots.dtype).max

        if pos_emb is not None:
            # The last kv_len rows of the slice the transformer passes in. Which rows those
            # are depends on how much memory is held now, so the row used for a given
            # distance drifts while memory fills. Kept for parity with upstream 0.4.0.
            pos_emb = pos_emb[:, -kv_len:].type(q.dtype)
            pos_dots = torch.einsum("bhid,hjd->bhij", q, pos_emb) * self.scale
            dots = dots + relative_shift(pos_dots)

        if input_mask is not None:
            # Padding mask is the outer product of the segment mask; memory always visible.
            pair_mask = input_mask[:, None, :, None] & input_mask[:, None, None, :]
            pair_mask = F.pad(pair_mask, (n_mem + n_cmem, 0), value=True)
            dots.masked_fill_(~pair_mask, mask_value)

        n_memory = n_mem + n_cmem
        causal_mask = torch.ones(t, t + n_memory, dtype=torch.bool, device=x.device)
        causal_mask = causal_mask.triu_(diagonal=1 + n_memory)
        dots.masked_fill_(causal_mask[None, None], mask_value)

        attn = self.attn_dropout(dots.softmax(dim=-1))
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        out = rearrange(out, "b h n d -> b n (h d)")
        out = self.dropout(self.to_out(out))

        # Upstream creates this leaf with requires_grad=True; kept so aux_loss.backward()
        # never raises, but as a 0-d scalar (upstream: shape (1,)).
        aux_loss = torch.zeros((), dtype=q.dtype, device=q.device, requires_grad=True)

        if t < self.seq_len or not calc_memory:
            return out, Memory(mem, cmem), aux_loss

        # Memory update: FIFO of mem_len slots; what falls out is compressed.
        queue = torch.cat((mem, x), dim=1)
        evicted, new_mem = queue[:, : -self.mem_len], queue[:, -self.mem_len :]
        # Left-pad by len(evicted) % ratio (not ratio - that), so part of the evicted
        # slots may be dropped by the strided conv. Kept for parity with upstream 0.4.0.
        padding = evicted.shape[1] % self.cmem_ratio
        if padding != 0:
            evicted = F.pad(evicted, (0, 0, padding, 0), value=0.0)

        # Upstream's Conv1d raises when 0 < len(evicted) < ratio after padding (e.g. one
        # slot evicted, ratio 4); here that yields nothing to compress, as the conv's
        # floor(len / ratio) output length says.
        if evicted.shape[1] < self.cmem_ratio or self.cmem_len <= 0:
            return out, Memory(new_mem, cmem), aux_loss

        compressed_mem = self.compress_mem_fn(evicted.detach())  # (b, len // ratio, d)
        new_cmem = torch.cat((cmem, compressed_mem), dim=1)[:, -self.cmem_len :]

        if not self.training:
            return out, Memory(new_mem, new_cmem), aux_loss

        # Auxiliary reconstruction loss; only the compressor learns from it. Upstream
        # called self.to_kv.weight.detach_() here, which froze K/V for good; a
        # stop-gradient copy of the weight gives the same values without that.
        cmem_k, cmem_v = F.linear(compressed_mem, self.to_kv.weight.detach()).chunk(2, dim=-1)
        cmem_k, cmem_v = map(self._split_heads, (cmem_k, cmem_v))
        # Target = attention over the whole current memory, not only the evicted part.
        # Kept for parity with upstream 0.4.0.
        mem_k, mem_v = k[:, :, n_cmem : n_cmem + n_mem], v[:, :, n_cmem : n_cmem + n_mem]
        q, mem_k, mem_v = q.detach(), mem_k.detach(), mem_v.detach()
        aux_loss = F.mse_loss(
            full_attn(q, mem_k, mem_v, self.reconstruction_attn_dropout),
            full_attn(q, cmem_k, cmem_v, self.reconstruction_attn_dropout),
        )
        return out, Memory(new_mem, new_cmem), aux_loss
