"""Adaptive input (Baevski & Auli 2019) and adaptive softmax (Grave et al. 2017) over clusters of
token ids, as Transformer-XL's WikiText-103 setup uses them (docs/paper-options.md).

Cluster 0 holds the ids [0, c1), cluster i the ids [c_i, c_{i+1}), the last [c_n, num_tokens);
cluster i works at width `dim // div_val**i`. The softmax is torch's
`nn.AdaptiveLogSoftmaxWithLoss` with a head bias; the embedding mirrors its layout.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from torch import Tensor, nn


def check_adaptive(
    num_tokens: int, dim: int, cutoffs: Sequence[int] | None, div_val: int
) -> tuple[list[int] | None, int]:
    """Validates adaptive_cutoffs / adaptive_div_val for a vocabulary and width; returns them normalised.

    cutoffs: strictly increasing ints in (0, num_tokens), or None (full embedding and softmax);
    div_val: an int >= 1 such that the last cluster's width dim // div_val**len(cutoffs) is >= 1.
    """
    if isinstance(div_val, bool) or not isinstance(div_val, int):
        raise TypeError(f"adaptive_div_val must be an int >= 1, got {div_val!r}")
    if div_val < 1:
        raise ValueError(f"adaptive_div_val must be an int >= 1, got {div_val}")
    if cutoffs is None:
        return None, div_val
    try:
        items = list(cutoffs)
        if isinstance(cutoffs, (str, bytes)) or any(isinstance(c, bool) for c in items):
            raise TypeError
        values = [operator.index(c) for c in items]
    except TypeError:
        raise TypeError(
            f"adaptive_cutoffs must be a list of ints in (0, num_tokens={num_tokens}) or None, got {cutoffs!r}"
        ) from None
    if not values:
        raise ValueError("adaptive_cutoffs must hold at least one cutoff (None for the full softmax), got []")
    if any(b <= a for a, b in zip(values, values[1:])) or values[0] <= 0 or values[-1] >= num_tokens:
        raise ValueError(
            f"adaptive_cutoffs must be strictly increasing ints in (0, num_tokens={num_tokens}), got {values}"
        )
    last_width = dim // div_val ** len(values)
    if last_width < 1:
        raise ValueError(
            f"adaptive_div_val={div_val} with {len(values)} cutoffs leaves the last cluster width "
            f"{dim} // {div_val}**{len(values)} = 0; expected >= 1 (use a smaller adaptive_div_val or fewer cutoffs)"
        )
    return values, div_val


def cluster_bounds(num_tokens: int, cutoffs: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, stop)] of each cluster's token ids: [0, c1), [c1, c2), ..., [c_n, num_tokens)."""
    edges = [0, *cutoffs, num_tokens]
    return list(zip(edges[:-1], edges[1:]))


class AdaptiveEmbedding(nn.Module):
    """Token ids (...) -> (..., dim): cluster i embeds at width dim // div_val**i, then projects to dim.

    Keys `emb_layers.{i}.weight` (cluster size, width) and `emb_projs.{i}.weight` (dim, width),
    a bias-free Linear (fairseq's AdaptiveInput; every cluster is projected, also at full width).
    """

    def __init__(self, num_tokens: int, dim: int, cutoffs: Sequence[int], div_val: int = 1):
        super().__init__()
        cutoffs, div_val = check_adaptive(num_tokens, dim, cutoffs, div_val)
        self.num_tokens, self.dim = num_tokens, dim
        self.bounds = cluster_bounds(num_tokens, cutoffs)
        widths = [dim // div_val**i for i in range(len(self.bounds))]
        self.emb_layers = nn.ModuleList([
            nn.Embedding(stop - start, width) for (start, stop), width in zip(self.bounds, widths)
        ])
        self.emb_projs = nn.ModuleList([nn.Linear(width, dim, bias=False) for width in widths])

    def forward(self, tokens: Tensor) -> Tensor:
        """Each id is embedded by its cluster's table and projection; (...) -> (..., dim)."""
        flat = tokens.reshape(-1)
        out = None
        for (start, stop), emb, proj in zip(self.bounds, self.emb_layers, self.emb_projs):
            rows = ((flat >= start) & (flat < stop)).nonzero().squeeze(1)
            vectors = proj(emb(flat.index_select(0, rows) - start))
            if out is None:
                out = vectors.new_zeros(flat.shape[0], self.dim)
            out = out.index_copy(0, rows, vectors)
        return out.reshape(*tokens.shape, self.dim)


class AdaptiveLogSoftmax(nn.AdaptiveLogSoftmaxWithLoss):
    """torch's adaptive softmax with a head bias, called on hidden (..., dim) -> log-probs (..., V).

    Keys: `head.weight` (cutoffs[0] + n_clusters, dim), `head.bias`, `tail.{i}.0.weight`
    (dim // div_val**(i+1), dim), `tail.{i}.1.weight` (cluster size, that width). The head's
    last n_clusters logits score the tail clusters, in order.
    """

    def __init__(self, dim: int, num_tokens: int, cutoffs: Sequence[int], div_val: int = 1):
        cutoffs, div_val = check_adaptive(num_tokens, dim, cutoffs, div_val)
        super().__init__(dim, num_tokens, cutoffs, div_value=float(div_val), head_bias=True)

    def forward(self, hidden: Tensor) -> Tensor:  # type: ignore[override]
        """The full log-probabilities (..., num_tokens); softmax of them is the adaptive distribution."""
        return self.log_probs(hidden)

    def log_probs(self, hidden: Tensor) -> Tensor:
        """log p(token | hidden) for every token: (..., dim) -> (..., num_tokens)."""
        flat = hidden.reshape(-1, self.in_features)
        return self.log_prob(flat).reshape(*hidden.shape[:-1], self.n_classes)

    def nll(self, hidden: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """-log p(target | hidden) per position, 0 where targets == ignore_index; (..., dim), (...) -> (...).

        Each tail cluster is evaluated only on the rows whose target it holds (torch's forward),
        so the (..., num_tokens) log-probabilities are never built.
        """
        flat_hidden = hidden.reshape(-1, self.in_features)
        flat_targets = targets.reshape(-1)
        rows = (flat_targets != ignore_index).nonzero().squeeze(1)
        out = flat_hidden.new_zeros(flat_targets.shape[0])
        if rows.numel() > 0:
            picked = super().forward(flat_hidden.index_select(0, rows), flat_targets.index_select(0, rows))
            out = out.index_copy(0, rows, -picked.output.reshape(-1))
        else:
            out = out + flat_hidden.sum() * 0.0  # keeps the graph, as a loss of all-ignored targets
        return out.reshape(targets.shape)
