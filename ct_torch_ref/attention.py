"""Self-attention over compressed memory | memory | segment, with the memory update and
the auxiliary loss of upstream 0.4.0, plus the paper-faithful options (docs/paper-options.md)."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .compression import (
    ConvDecompress,
    eviction_padding,
    make_compressor,
    reads_per_slot,
    select_most_used,
    windows,
)
from .positions import sinusoid_encoding

Memory = namedtuple("Memory", ["mem", "compressed_mem"])
# compression="most_used" also carries each memory slot's summed attention (l, b, m).
UsageMemory = namedtuple("UsageMemory", ["mem", "compressed_mem", "mem_usage"])


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
        compression: str = "conv",
        reconstruction_target: str = "memory",
        aux_loss: str = "attention",
        eviction_padding: str = "upstream",
        relative_positions: str = "learned",
        clamp_len: int | None = None,
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
        self.compression = compression
        self.reconstruction_target = reconstruction_target
        self.aux_loss = aux_loss
        self.eviction_padding = eviction_padding
        self.relative_positions = relative_positions
        self.clamp_len = clamp_len

        # Creation order as upstream, so that a seeded init draws the same numbers; the
        # options' parameters come after upstream's.
        self.compress_mem_fn = make_compressor(compression, dim, cmem_ratio)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, dim * 2, bias=False)
        self.to_out = nn.Linear(dim, dim)

        self.attn_dropout = nn.Dropout(attn_dropout)
        self.dropout = nn.Dropout(dropout)
        self.reconstruction_attn_dropout = nn.Dropout(reconstruction_attn_dropout)

        if aux_loss == "autoencoder":
            self.decompress_mem_fn = ConvDecompress(dim, cmem_ratio)
        if relative_positions == "sinusoidal":
            # Transformer-XL: projection of the sinusoids, content bias u, position bias v.
            self.to_pos = nn.Linear(dim, dim, bias=False)
            self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.dim_head))
            self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.dim_head))

    def _split_heads(self, t: Tensor) -> Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    def _logits(self, q: Tensor, k: Tensor, pos_emb: Tensor | None) -> Tensor:
        """Scaled content + relative-position logits (b, h, t, kv_len)."""
        kv_len = k.shape[2]
        if self.relative_positions == "sinusoidal":
            # Row r of the encodings is distance kv_len - 1 - r, the layout relative_shift reads.
            distances = torch.arange(kv_len - 1, -1, -1, device=q.device)
            encodings = sinusoid_encoding(distances, self.to_pos.in_features, self.clamp_len).to(q.dtype)
            pos_keys = self._split_heads(self.to_pos(encodings)[None])[0]  # (h, kv_len, dh)
            content_q = q + self.pos_bias_u[None, :, None, :].to(q.dtype)
            position_q = q + self.pos_bias_v[None, :, None, :].to(q.dtype)
            dots = torch.einsum("bhid,bhjd->bhij", content_q, k) * self.scale
            pos_dots = torch.einsum("bhid,hjd->bhij", position_q, pos_keys) * self.scale
            return dots + relative_shift(pos_dots)
        dots = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        if pos_emb is not None:
            # The last kv_len rows of the slice the transformer passes in. Which rows those
            # are depends on how much memory is held now, so the row used for a given
            # distance drifts while memory fills. Kept for parity with upstream 0.4.0.
            pos_emb = pos_emb[:, -kv_len:].type(q.dtype)
            pos_dots = torch.einsum("bhid,hjd->bhij", q, pos_emb) * self.scale
            dots = dots + relative_shift(pos_dots)
        return dots

    def forward(
        self,
        x: Tensor,
        memories: tuple[Tensor, ...] | None = None,
        pos_emb: Tensor | None = None,
        input_mask: Tensor | None = None,
        calc_memory: bool = True,
        memory_gradients: bool = False,
    ) -> tuple[Tensor, Memory | UsageMemory, Tensor]:
        """x (b, t, d) layer-normed; memories (mem (b, m, d), cmem (b, c, d)[, usage (b, m)])
        or None; pos_emb (h, >= c+m+t, dh) for learned positions; input_mask (b, t) bool;
        memory_gradients: the new memories keep their graph (compression included).
        Returns (out (b, t, d), the new memories (with usage under "most_used"), aux loss 0-d)."""
        b, t, e = x.shape
        mem, cmem, usage = (tuple(memories) + (None,))[:3] if memories is not None else (None,) * 3
        mem = x.new_empty(b, 0, e) if mem is None else mem
        cmem = x.new_empty(b, 0, e) if cmem is None else cmem
        n_mem, n_cmem = mem.shape[1], cmem.shape[1]
        most_used = self.compression == "most_used"
        if most_used and usage is None:
            usage = x.new_zeros(b, n_mem)

        def result(new_mem: Tensor, new_cmem: Tensor, new_usage: Tensor | None, aux: Tensor) -> tuple:
            if most_used:
                return out, UsageMemory(new_mem, new_cmem, new_usage), aux
            return out, Memory(new_mem, new_cmem), aux

        q = self.to_q(x)
        kv_input = torch.cat((cmem, mem, x), dim=1)  # (b, c+m+t, d)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        q, k, v = map(self._split_heads, (q, k, v))

        dots = self._logits(q, k, pos_emb)
        # Finite -finfo.max (not -inf): a fully masked row becomes uniform, not NaN.
        # Kept for parity with upstream 0.4.0.
        mask_value = -torch.finfo(dots.dtype).max

        if input_mask is not None:
            # Padding mask is the outer product of the segment mask; memory always visible.
            pair_mask = input_mask[:, None, :, None] & input_mask[:, None, None, :]
            pair_mask = F.pad(pair_mask, (n_mem + n_cmem, 0), value=True)
            dots.masked_fill_(~pair_mask, mask_value)

        n_memory = n_mem + n_cmem
        causal_mask = torch.ones(t, t + n_memory, dtype=torch.bool, device=x.device)
        causal_mask = causal_mask.triu_(diagonal=1 + n_memory)
        dots.masked_fill_(causal_mask[None, None], mask_value)

        probs = dots.softmax(dim=-1)
        attn = self.attn_dropout(probs)
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        out = rearrange(out, "b h n d -> b n (h d)")
        out = self.dropout(self.to_out(out))

        # Upstream creates this leaf with requires_grad=True; kept so aux_loss.backward()
        # never raises, but as a 0-d scalar (upstream: shape (1,)).
        aux_loss = torch.zeros((), dtype=q.dtype, device=q.device, requires_grad=True)

        if t < self.seq_len or not calc_memory:
            return result(mem, cmem, usage, aux_loss)

        # Memory update: FIFO of mem_len slots; what falls out is compressed.
        queue = torch.cat((mem, x), dim=1)
        evicted, new_mem = queue[:, : -self.mem_len], queue[:, -self.mem_len :]
        n_evicted = evicted.shape[1]
        new_usage = None
        if most_used:
            usage = usage + self._attention_received(probs[..., n_cmem:n_memory], input_mask)
            new_usage = torch.cat((usage, usage.new_zeros(b, t)), dim=1)[:, -self.mem_len :]
        # Upstream left-pads by len(evicted) % ratio (not ratio - that), so part of the
        # evicted slots may be dropped by the strided conv; eviction_padding="exact" fixes it.
        padding = eviction_padding(n_evicted, self.cmem_ratio, self.eviction_padding)
        n_out = (n_evicted + padding) // self.cmem_ratio

        # Upstream's Conv1d raises when 0 < len(evicted) < ratio after padding (e.g. one
        # slot evicted, ratio 4); here that yields nothing to compress, as the conv's
        # floor(len / ratio) output length says.
        if n_out == 0 or self.cmem_len <= 0:
            return result(new_mem, cmem, new_usage, aux_loss)

        padded = F.pad(evicted, (0, 0, padding, 0), value=0.0)
        if most_used:
            reads = reads_per_slot(n_mem, self.mem_len, self.seq_len).to(usage.device)
            scores = usage[:, :n_evicted] / reads[:n_evicted].to(usage.dtype)
            compress = lambda source: select_most_used(source[:, padding:], scores, n_out)  # noqa: E731
        else:
            compress = self.compress_mem_fn
        # The compressor reads stop-gradient memories unless memory gradients are on.
        compressed_mem = compress(padded if memory_gradients else padded.detach())  # (b, n_out, d)
        new_cmem = torch.cat((cmem, compressed_mem), dim=1)[:, -self.cmem_len :]

        if not self.training or self.aux_loss == "none":
            return result(new_mem, new_cmem, new_usage, aux_loss)
        # The aux loss trains the compressor only: it reads stop-gradient memories.
        aux_compressed = compress(padded.detach()) if memory_gradients else compressed_mem

        if self.aux_loss == "autoencoder":
            # Decode the compressed slots back to the windows they were made from.
            target = windows(padded.detach(), self.cmem_ratio).flatten(1, 2)  # (b, n_out r, d)
            aux_loss = F.mse_loss(self.decompress_mem_fn(aux_compressed), target)
            return result(new_mem, new_cmem, new_usage, aux_loss)

        # Attention reconstruction. Upstream called self.to_kv.weight.detach_() here, which
        # froze K/V for good; a stop-gradient copy of the weight gives the same values.
        cmem_k, cmem_v = F.linear(aux_compressed, self.to_kv.weight.detach()).chunk(2, dim=-1)
        cmem_k, cmem_v = map(self._split_heads, (cmem_k, cmem_v))
        # Upstream's target: attention over the whole current memory; the paper's
        # (reconstruction_target="evicted"): over the evicted slots only.
        n_target = n_mem if self.reconstruction_target == "memory" else n_evicted
        mem_k, mem_v = k[:, :, n_cmem : n_cmem + n_target], v[:, :, n_cmem : n_cmem + n_target]
        q, mem_k, mem_v = q.detach(), mem_k.detach(), mem_v.detach()
        aux_loss = F.mse_loss(
            full_attn(q, mem_k, mem_v, self.reconstruction_attn_dropout),
            full_attn(q, cmem_k, cmem_v, self.reconstruction_attn_dropout),
        )
        return result(new_mem, new_cmem, new_usage, aux_loss)

    def _attention_received(self, mem_probs: Tensor, input_mask: Tensor | None) -> Tensor:
        """(b, h, t, m) attention on the memory -> (b, m): mean over heads and real queries."""
        b, h, t, _ = mem_probs.shape
        weight = (
            input_mask.to(mem_probs.dtype) if input_mask is not None
            else mem_probs.new_ones(b, t)
        )
        n_real = weight.sum(dim=1).clamp(min=1.0)  # (b,)
        received = torch.einsum("bhim,bi->bm", mem_probs.detach(), weight)
        return received / (h * n_real[:, None])
