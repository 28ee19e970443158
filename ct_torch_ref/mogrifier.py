"""Mogrifier gate (Melis et al. 2019), vendored from PyPI `mogrifier` 0.0.5.

Only the parameter layout has to match 0.0.5 (so upstream checkpoints load strictly):
with `factorize_k` the projections are `Q.0.0`, `Q.0.1` (two biased Linears), without it
`Q.0`; likewise for `R`.
"""

from __future__ import annotations

from torch import Tensor, nn


def _projection(dim_in: int, dim_out: int, k: int | None) -> nn.Module:
    """A Linear, or a rank-k factorised pair of Linears when k is given (as 0.0.5)."""
    if k is None:
        return nn.Linear(dim_in, dim_out)
    if not (k < dim_in and k < dim_out):
        raise ValueError(
            f"factorize_k must be smaller than both dimensions ({dim_in}, {dim_out}), got {k}"
        )
    return nn.Sequential(nn.Linear(dim_in, k), nn.Linear(k, dim_out))


class Mogrifier(nn.Module):
    """Alternately rescales inputs by sigmoid(Q h) and hiddens by sigmoid(R x), `iters` times."""

    def __init__(
        self,
        dim: int,
        iters: int = 5,
        factorize_k: int | None = None,
        dim_hidden: int | None = None,
        hidden_factorize_k: int | None = None,
    ):
        super().__init__()
        if iters <= 1:
            raise ValueError(f"iters must be > 1, got {iters}")
        dim_hidden = dim if dim_hidden is None else dim_hidden
        self.dim = dim
        self.dim_hidden = dim_hidden
        self.iters = iters
        # Creation order Q then R, as 0.0.5, so a seeded init draws the same numbers.
        self.Q = nn.Sequential(_projection(dim_hidden, dim, factorize_k), nn.Sigmoid())
        r_k = factorize_k if hidden_factorize_k is None else hidden_factorize_k
        self.R = nn.Sequential(_projection(dim, dim_hidden, r_k), nn.Sigmoid())

    def forward(
        self, inputs: Tensor, hiddens: Tensor, iters: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """inputs (..., dim), hiddens (..., dim_hidden) -> both mogrified, same shapes."""
        iters = self.iters if iters is None else iters
        if inputs.ndim == 3 and hiddens.ndim == 2:
            hiddens = hiddens[:, None, :].expand(-1, inputs.shape[1], -1)
        if inputs.shape[-1] != self.dim or hiddens.shape[-1] != self.dim_hidden:
            raise ValueError(
                f"expected inputs (..., {self.dim}) and hiddens (..., {self.dim_hidden}), "
                f"got {tuple(inputs.shape)} and {tuple(hiddens.shape)}"
            )
        if inputs.shape[:-1] != hiddens.shape[:-1]:
            raise ValueError(
                f"inputs and hiddens must share leading dims, got {tuple(inputs.shape)} "
                f"and {tuple(hiddens.shape)}"
            )
        lead_shape = inputs.shape[:-1]
        inputs = inputs.reshape(-1, self.dim)  # (n, dim)
        hiddens = hiddens.reshape(-1, self.dim_hidden)  # (n, dim_hidden)
        for ind in range(iters):
            # Same operation order as 0.0.5 ((2 * gate) * x) for bitwise-equal results.
            if ind % 2 == 0:
                inputs = 2 * self.Q(hiddens) * inputs
            else:
                hiddens = 2 * self.R(inputs) * hiddens
        return inputs.reshape(*lead_shape, self.dim), hiddens.reshape(*lead_shape, self.dim_hidden)
