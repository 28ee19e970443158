"""The Compressive Transformer of `compressive-transformer-pytorch` 0.4.0, for one segment.

Same constructor keywords, defaults, state_dict keys and forward values as upstream;
invalid arguments raise ValueError/TypeError instead of asserting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax
from .attention import Memory, SelfAttention, UsageMemory
from .config import normalize_config
from .layers import FeedForward, GRUGating, PreNorm, Residual


class CompressiveTransformer(nn.Module):
    """Compressive Transformer over one segment: tokens (b, t) -> (logits, Memory, aux loss).

    Keywords and defaults are those of upstream 0.4.0, plus the paper-faithful options
    (compression, reconstruction_target, aux_loss, eviction_padding, relative_positions and
    its clamp_len; docs/paper-options.md) whose defaults are upstream's, and adaptive input and softmax
    (adaptive_cutoffs, adaptive_div_val; docs/paper-options.md) off by default; `self.config`
    holds them normalised.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        seq_len: int,
        depth: int,
        emb_dim: int | None = None,
        memory_layers: Iterable[int] | None = None,
        enhanced_recurrence: bool = True,
        mem_len: int | None = None,
        cmem_len: int | None = None,
        cmem_ratio: int = 4,
        heads: int = 8,
        gru_gated_residual: bool = True,
        mogrify_gru: bool = False,
        attn_dropout: float = 0.0,
        ff_glu: bool = False,
        ff_dropout: float = 0.0,
        attn_layer_dropout: float = 0.0,
        reconstruction_attn_dropout: float = 0.0,
        reconstruction_loss_weight: float = 1.0,
        compression: str = "conv",
        reconstruction_target: str = "memory",
        aux_loss: str = "attention",
        eviction_padding: str = "upstream",
        relative_positions: str = "learned",
        clamp_len: int | None = None,
        adaptive_cutoffs: Sequence[int] | None = None,
        adaptive_div_val: int = 1,
    ):
        super().__init__()
        self.config = c = normalize_config(
            num_tokens=num_tokens, dim=dim, seq_len=seq_len, depth=depth, emb_dim=emb_dim,
            memory_layers=memory_layers, enhanced_recurrence=enhanced_recurrence,
            mem_len=mem_len, cmem_len=cmem_len, cmem_ratio=cmem_ratio, heads=heads,
            gru_gated_residual=gru_gated_residual, mogrify_gru=mogrify_gru,
            attn_dropout=attn_dropout, ff_glu=ff_glu, ff_dropout=ff_dropout,
            attn_layer_dropout=attn_layer_dropout,
            reconstruction_attn_dropout=reconstruction_attn_dropout,
            reconstruction_loss_weight=reconstruction_loss_weight,
            compression=compression, reconstruction_target=reconstruction_target,
            aux_loss=aux_loss, eviction_padding=eviction_padding,
            relative_positions=relative_positions, clamp_len=clamp_len,
            adaptive_cutoffs=adaptive_cutoffs, adaptive_div_val=adaptive_div_val,
        )
        self.num_tokens = c["num_tokens"]
        self.dim = c["dim"]
        self.seq_len = c["seq_len"]
        self.depth = c["depth"]
        self.mem_len = c["mem_len"]
        self.cmem_len = c["cmem_len"]
        self.memory_layers = list(c["memory_layers"])
        self.enhanced_recurrence = c["enhanced_recurrence"]
        self.reconstruction_loss_weight = c["reconstruction_loss_weight"]
        self.compression = c["compression"]
        self.relative_positions = c["relative_positions"]
        cutoffs = c.get("adaptive_cutoffs")
        self.adaptive = cutoffs is not None

        # Modules are created in upstream's order, so a seeded init draws the same numbers
        # and state_dict() lists the same keys in the same order.
        emb_dim = c["emb_dim"]
        if self.adaptive:
            self.token_emb = AdaptiveEmbedding(num_tokens, emb_dim, cutoffs, c["adaptive_div_val"])
        else:
            self.token_emb = nn.Embedding(num_tokens, emb_dim)
        self.to_model_dim = nn.Identity() if emb_dim == dim else nn.Linear(emb_dim, dim)
        if c["relative_positions"] == "learned":
            total_positions = seq_len + c["mem_len"] + c["cmem_len"]
            self.pos_emb = nn.Parameter(torch.zeros(heads, total_positions, dim // heads))
        else:  # sinusoidal: each attention layer holds its own projection and biases
            self.pos_emb = None
        self.to_logits = nn.Sequential(
            nn.Identity() if emb_dim == dim else nn.Linear(dim, emb_dim),
            AdaptiveLogSoftmax(emb_dim, num_tokens, cutoffs, c["adaptive_div_val"]) if self.adaptive
            else nn.Linear(emb_dim, num_tokens),
        )

        if c["gru_gated_residual"]:
            wrapper = partial(GRUGating, dim, mogrify=c["mogrify_gru"])
        else:
            wrapper = Residual
        # Every layer gets a compressor (unused outside memory layers), as upstream.
        self.attn_layers = nn.ModuleList([
            wrapper(PreNorm(dim, SelfAttention(
                dim, seq_len, c["mem_len"], c["cmem_len"], cmem_ratio, heads,
                attn_dropout=c["attn_dropout"], dropout=c["attn_layer_dropout"],
                reconstruction_attn_dropout=c["reconstruction_attn_dropout"],
                compression=c["compression"], reconstruction_target=c["reconstruction_target"],
                aux_loss=c["aux_loss"], eviction_padding=c["eviction_padding"],
                relative_positions=c["relative_positions"], clamp_len=c.get("clamp_len"),
            )))
            for _ in range(depth)
        ])
        self.ff_layers = nn.ModuleList([
            wrapper(PreNorm(dim, FeedForward(dim, dropout=c["ff_dropout"], glu=c["ff_glu"])))
            for _ in range(depth)
        ])

    def forward(
        self,
        x: Tensor,
        memories: Sequence[Tensor | None] | None = None,
        mask: Tensor | None = None,
        memory_gradients: bool = False,
    ) -> tuple[Tensor, Memory | UsageMemory, Tensor]:
        """One segment: `features` then the output layer (arguments and results: `features`).

        Returns logits (b, t, num_tokens); an adaptive model returns its log-probabilities,
        whose softmax is the adaptive distribution (for sampling and evaluation).
        """
        hidden, next_memory, aux_loss = self.features(x, memories, mask, memory_gradients)
        return self.to_logits(hidden), next_memory, aux_loss

    def lm_loss(self, hidden: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Mean NLL of targets (b, t) from `features`' hidden (b, t, dim), ignore_index skipped.

        Full softmax: cross_entropy of the logits, as upstream's wrapper. Adaptive: each tail
        cluster only on the positions whose target it holds; the (b, t, num_tokens) log-probs
        are never built. All targets ignored: 0, with a graph.
        """
        kept = targets != ignore_index
        if not kept.any():
            return hidden.sum() * 0.0
        if not self.adaptive:
            return F.cross_entropy(self.to_logits(hidden).transpose(1, 2), targets, ignore_index=ignore_index)
        project, softmax = self.to_logits
        nll = softmax.nll(project(hidden), targets, ignore_index)
        return nll.sum() / kept.sum().to(nll.dtype)

    def features(
        self,
        x: Tensor,
        memories: Sequence[Tensor | None] | None = None,
        mask: Tensor | None = None,
        memory_gradients: bool = False,
    ) -> tuple[Tensor, Memory | UsageMemory, Tensor]:
        """One segment up to the output layer.

        x: (b, t) integer tokens in [0, num_tokens), 1 <= t <= seq_len.
        memories: Memory(mem (L, b, m, dim), compressed_mem (L, b, c, dim)) from the
            previous segment, L = len(memory_layers), or None (either part may be None);
            under compression="most_used" a UsageMemory, which adds mem_usage (L, b, m).
        mask: (b, t) bool, True = real token.
        memory_gradients: return the next memories with their graph (the paper's BPTT
            through memory) instead of detached.
        Returns the last layer's output (b, t, dim), the next memories (stop-gradient unless
        memory_gradients) and the aux loss as a 0-d tensor (non-zero only in training
        mode, when something was compressed).
        """
        self._check_inputs(x, memories, mask)
        x = self.to_model_dim(self.token_emb(x))
        b, t, d = x.shape

        mem, cmem, usage = (tuple(memories) + (None,))[:3] if memories is not None else (None,) * 3
        n_memory_layers = len(self.memory_layers)
        mem = x.new_empty(n_memory_layers, b, 0, d) if mem is None else mem
        cmem = x.new_empty(n_memory_layers, b, 0, d) if cmem is None else cmem
        most_used = self.compression == "most_used"
        if most_used and usage is None:
            usage = x.new_zeros(n_memory_layers, b, mem.shape[2])

        pos_emb = None
        if self.pos_emb is not None:
            total_len = mem.shape[2] + cmem.shape[2] + self.seq_len
            pos_emb = self.pos_emb[:, (self.seq_len - t) : total_len]

        aux_loss = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)

        if self.enhanced_recurrence:
            # Layer i attends to the memory made by memory layer i + 1, the top one to the
            # lowest one's. Also applies to short segments, whose returned memory is
            # therefore this rolled one. Kept for parity with upstream 0.4.0.
            mem = torch.roll(mem, -1, 0)
            cmem = torch.roll(cmem, -1, 0)
            usage = torch.roll(usage, -1, 0) if most_used else None

        next_memories = []
        memory_index = 0
        for layer_num, (attn, ff) in enumerate(zip(self.attn_layers, self.ff_layers), start=1):
            use_memory = layer_num in self.memory_layers
            layer_memories = None
            if use_memory:
                layer_memories = (mem[memory_index], cmem[memory_index])
                if most_used:
                    layer_memories += (usage[memory_index],)
                memory_index += 1

            x, layer_memory_out, layer_aux_loss = attn(
                x, memories=layer_memories, calc_memory=use_memory, input_mask=mask,
                pos_emb=pos_emb, memory_gradients=memory_gradients,
            )
            (x,) = ff(x)
            aux_loss = aux_loss + layer_aux_loss
            if use_memory:
                next_memories.append(layer_memory_out)

        stacked = [torch.stack(parts) for parts in zip(*next_memories)]
        if not memory_gradients:
            stacked = [part.detach() for part in stacked]
        next_memory = UsageMemory(*stacked) if most_used else Memory(*stacked)
        aux_loss = aux_loss * self.reconstruction_loss_weight / n_memory_layers
        return x, next_memory, aux_loss

    def _check_inputs(
        self, x: Any, memories: Any, mask: Any
    ) -> None:
        """Raises TypeError/ValueError naming the argument when inputs do not fit this model."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of token ids, got {type(x).__name__}")
        if x.dtype not in (torch.int32, torch.int64):  # what nn.Embedding takes
            raise TypeError(f"x must hold token ids as torch.int64 or torch.int32, got {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"x must have shape (batch, t), got {tuple(x.shape)}")
        b, t = x.shape
        if not 1 <= t <= self.seq_len:
            raise ValueError(
                f"x has segment length t={t}, expected 1 <= t <= seq_len={self.seq_len}"
            )
        if x.numel() > 0:
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= self.num_tokens:
                raise ValueError(
                    f"x token ids must be in [0, num_tokens={self.num_tokens}), "
                    f"got values in [{low}, {high}]"
                )

        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise TypeError(f"mask must be a bool tensor (True = real token), got {got}")
            if tuple(mask.shape) != (b, t):
                raise ValueError(f"mask must have shape {(b, t)} like x, got {tuple(mask.shape)}")

        if memories is None:
            return
        if isinstance(memories, Tensor) or len(memories) not in (2, 3):
            raise TypeError(
                "memories must be Memory(mem, compressed_mem) (or a pair), or UsageMemory("
                f"mem, compressed_mem, mem_usage), got {type(memories).__name__}"
            )
        n_layers = len(self.memory_layers)
        for name, tensor, max_len in (
            ("memories.mem", memories[0], self.mem_len),
            ("memories.compressed_mem", memories[1], self.cmem_len),
        ):
            if tensor is None:
                continue
            if not isinstance(tensor, Tensor) or not tensor.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor, got {tensor!r:.80}")
            shape = tuple(tensor.shape)
            if (
                len(shape) != 4
                or shape[0] != n_layers
                or shape[1] != b
                or shape[3] != self.dim
                or shape[2] > max_len
            ):
                raise ValueError(
                    f"{name} must have shape (n_memory_layers={n_layers}, batch={b}, "
                    f"length <= {max_len}, dim={self.dim}), got {shape}"
                )
        usage = memories[2] if len(memories) == 3 else None
        if usage is not None:
            mem_slots = memories[0].shape[2] if memories[0] is not None else 0
            expected = (n_layers, b, mem_slots)
            if not isinstance(usage, Tensor) or tuple(usage.shape) != expected:
                got = tuple(usage.shape) if isinstance(usage, Tensor) else type(usage).__name__
                raise ValueError(f"memories.mem_usage must have shape {expected} like mem, got {got}")
