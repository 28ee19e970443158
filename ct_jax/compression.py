"""How evicted memories become compressed slots (docs/paper-options.md): the compressors of
the `compression` option on pre-cut windows, most-used selection and the auto-encoding decoder.

Windows come from `ct_jax.memory.evicted_windows` as (b, n, r, d), right-aligned, invalid
windows zero; every compressor maps them to (b, n, d) without mixing windows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ct_jax.layers import ConvCompress, _uniform


def dilation_rates(ratio: int) -> list[int]:
    """Dilations of the dilated compressor's kernel-2 layers: 1, 2, 4, ... below ratio."""
    rates, rate = [], 1
    while rate < ratio:
        rates.append(rate)
        rate *= 2
    return rates


class PoolCompress(nnx.Module):
    """Mean or max over each window (no parameters)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, windows: Float[Array, "b n r d"]) -> Float[Array, "b n d"]:
        return jnp.mean(windows, axis=2) if self.kind == "mean_pool" else jnp.max(windows, axis=2)


class DilatedKernel(nnx.Module):
    """One bias-free kernel-2 convolution, kernel (2, in, out): [0] reads the older slot."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype):
        self.kernel = nnx.Param(_uniform(1.0 / (2 * dim) ** 0.5)(rngs.params(), (2, dim, dim), param_dtype))


class DilatedConvCompress(nnx.Module):
    """Sonnet v1's dilated compressor within each window: kernel-2 convolutions at dilations
    1, 2, 4, ... < ratio, causally zero-padded inside the window, each followed by ReLU, then
    upstream's strided convolution (`kernel`, `bias` as `ConvCompress`)."""

    def __init__(self, dim: int, ratio: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.rates = tuple(dilation_rates(ratio))
        self.dilated = nnx.List([DilatedKernel(dim, rngs=rngs, param_dtype=param_dtype) for _ in self.rates])
        self.conv = ConvCompress(dim, ratio, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, windows: Float[Array, "b n r d"]) -> Float[Array, "b n d"]:
        hidden = windows.astype(self.dtype)
        for rate, layer in zip(self.rates, self.dilated):
            kernel = layer.kernel[...].astype(self.dtype)  # (2, in, out)
            older = jnp.pad(hidden, ((0, 0), (0, 0), (rate, 0), (0, 0)))[:, :, : hidden.shape[2]]
            hidden = jax.nn.relu(older @ kernel[0] + hidden @ kernel[1])  # (b, n, r, d)
        return self.conv(hidden)


class ConvDecompress(nnx.Module):
    """Auto-encoding decoder, torch's ConvTranspose1d(kernel = stride = ratio) with bias:
    (b, n, d) -> (b, n, r, d). `kernel` is stored (r, out, in), torch's (in, out, r) reversed."""

    def __init__(self, dim: int, ratio: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        bound = 1.0 / (dim * ratio) ** 0.5
        self.kernel = nnx.Param(_uniform(bound)(rngs.params(), (ratio, dim, dim), param_dtype))
        self.bias = nnx.Param(_uniform(bound)(rngs.params(), (dim,), param_dtype))
        self.dtype = dtype

    def __call__(self, compressed: Float[Array, "b n d"]) -> Float[Array, "b n r d"]:
        kernel = self.kernel[...].astype(self.dtype)
        decoded = jnp.einsum("bni,roi->bnro", compressed.astype(self.dtype), kernel)  # (b, n, r, d)
        return decoded + self.bias[...].astype(self.dtype)


def make_compressor(kind: str, dim: int, ratio: int, *, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Module | None:
    """The compression module of an attention layer; None for "most_used" (it selects slots)."""
    if kind == "conv":
        return ConvCompress(dim, ratio, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if kind in ("mean_pool", "max_pool"):
        return PoolCompress(kind)
    if kind == "dilated_conv":
        return DilatedConvCompress(dim, ratio, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    return None


def reads_per_slot(mem_len: int, seq_len: int) -> np.ndarray:
    """How many full segments have read the slot at each place of a full buffer (this one
    included): it entered at one of the last seq_len places and moves seq_len left per segment."""
    place = np.arange(mem_len)
    return (mem_len - 1 - place) // seq_len + 1


def attention_received(
    mem_probs: Float[Array, "b h t m"], mask: Bool[Array, "b t"] | None
) -> Float[Array, "b m"]:
    """Attention on each memory slot, averaged over heads and the real (mask True) queries."""
    b, h, t, _ = mem_probs.shape
    weight = jnp.ones((b, t), mem_probs.dtype) if mask is None else mask.astype(mem_probs.dtype)
    n_real = jnp.maximum(jnp.sum(weight, axis=1), 1.0)  # (b,)
    received = jnp.einsum("bhim,bi->bm", jax.lax.stop_gradient(mem_probs), weight)  # (b, m)
    return received / (h * n_real[:, None])


def select_most_used(
    region: Float[Array, "b t d"],
    scores: Float[Array, "b t"],
    valid: Bool[Array, "#b t"],
    n_keep: Int[Array, "*#batch"],
    n_out: int,
) -> Float[Array, "b o d"]:
    """The n_keep valid slots of `region` with the highest scores, in their original order,
    right-aligned in n_out slots (zeros before). Ties go to the older (earlier) slot.

    Exact: each output is one slot times 1 plus the others times 0, as a one-hot matmul.
    """
    t = region.shape[1]
    index = jnp.arange(t)
    higher = scores[:, None, :] > scores[:, :, None]  # (b, i, j): slot j scores above slot i
    tie_older = (scores[:, None, :] == scores[:, :, None]) & (index[None, :] < index[:, None])[None]
    rank = jnp.sum((higher | tie_older) & valid[:, None, :], axis=-1)  # among the valid slots
    n_keep = jnp.broadcast_to(jnp.asarray(n_keep), (region.shape[0],))[:, None]  # (b, 1)
    keep = valid & (rank < n_keep)  # (b, t)
    place = n_out - n_keep + jnp.cumsum(keep, axis=1) - 1  # output slot of each kept slot
    one_hot = keep[:, None, :] & (place[:, None, :] == jnp.arange(n_out)[None, :, None])  # (b, o, t)
    return jnp.einsum("bot,btd->bod", one_hot.astype(region.dtype), region)
