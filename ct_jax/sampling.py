"""Next-token sampling: upstream's logit filters (top-k, nucleus) and a greedy-or-draw step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

FilterFn = Callable[..., jax.Array]


def top_k(logits: Float[Array, "... v"], thres: float = 0.9) -> Float[Array, "... v"]:
    """Keeps the k = int((1 - thres) * vocab) largest logits (at least 1), the rest -inf.

    Upstream's meaning of `thres` (0.9 keeps the top 10%), with upstream's empty top-k on
    small vocabularies fixed as in ct_torch_ref.
    """
    vocab = logits.shape[-1]
    k = min(vocab, max(1, int((1 - thres) * vocab)))
    values, indices = jax.lax.top_k(logits, k)
    kept = jnp.full_like(logits, -jnp.inf)
    return jnp.put_along_axis(kept, indices, values, axis=-1, inplace=False)


def top_p(logits: Float[Array, "... v"], thres: float = 0.9) -> Float[Array, "... v"]:
    """Nucleus filter with upstream's `thres`: keeps the most likely tokens up to and
    including the first whose cumulative probability exceeds 1 - thres (always >= 1)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum_probs = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cum_probs > (1 - thres)
    remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
    sorted_logits = jnp.where(remove, -jnp.inf, sorted_logits)
    return jnp.put_along_axis(logits, order, sorted_logits, axis=-1, inplace=False)


FILTERS: dict[str, FilterFn] = {"top_k": top_k, "top_p": top_p}


@jax.named_scope("sampling")
def draw(logits: Float[Array, "b v"], key: jax.Array, temperature: Float[Array, ""], filter_fn: FilterFn | None,
         filter_thres: float) -> Int[Array, " b"]:
    """Greedy where temperature == 0, else a draw from softmax(filter(logits) / temperature).

    A branch, not a select: greedy decoding runs no filter and no categorical draw."""

    def greedy(logits: Float[Array, "b v"]) -> Int[Array, " b"]:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(logits: Float[Array, "b v"]) -> Int[Array, " b"]:
        filtered = filter_fn(logits, thres=filter_thres) if filter_fn is not None else logits
        return jax.random.categorical(key, filtered / temperature, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, greedy, logits)
