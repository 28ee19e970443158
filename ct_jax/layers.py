"""Small building blocks: feed-forward, torch-style GRU gate, Mogrifier, Conv1d compressor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

MOGRIFIER_ITERS = 5  # mogrifier's default, as upstream's GRUGating uses it


def _uniform(bound: float):
    """torch's default Linear/GRU init: U(-bound, bound)."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@jax.custom_vjp
def dense(x: Float[Array, "*lead i"], kernel: Float[Array, "i o"]) -> Float[Array, "*lead o"]:
    """x @ kernel, whose kernel gradient is a plain (i, n) x (n, o) product.

    XLA's autodiff contracts the batch axis of x in place (a dot whose left operand contracts
    its first axis), which XLA:CPU runs as a plain dot at 50-70 GFLOP/s inside the train step
    against ~105 for its matmul; transposing x once (a copy) and multiplying is faster, and
    the train step 6-8% faster on S and M (docs/benchmarks.md). Values are those of x @ kernel.
    """
    return x @ kernel


def _dense_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _dense_bwd(residuals, grad):
    x, kernel = residuals
    rows_x, rows_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # [n, i], [n, o]
    # The barrier keeps XLA from folding the transpose back into the dot's dimension numbers.
    kernel_grad = jax.lax.optimization_barrier(rows_x.T) @ rows_grad  # [i, o]
    return grad @ kernel.T, kernel_grad.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`nnx.Linear`'s product through `dense` (it contracts the last axis of x with the kernel's first);
    any other product (or a sharding / precision request) as `lax.dot_general`."""
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or precision is not None or any(
            value is not None for value in kwargs.values()):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    out = dense(lhs, rhs)
    return out if preferred_element_type is None else out.astype(preferred_element_type)


def linear(din: int, dout: int, *, use_bias: bool = True, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Linear:
    """`nnx.Linear` initialised as torch's `nn.Linear` (so fresh models train alike)."""
    bound = 1.0 / max(din, 1) ** 0.5
    return nnx.Linear(
        din, dout, use_bias=use_bias, kernel_init=_uniform(bound), bias_init=_uniform(bound),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs, dot_general=_dense_dot_general,
    )


def wide(dtype) -> jnp.dtype:
    """The dtype for numerically sensitive parts: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def layer_norm(dim: int, *, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.LayerNorm:
    """LayerNorm with torch's eps (1e-5, not Flax's 1e-6), computed in at least float32."""
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, dtype=wide(dtype), param_dtype=param_dtype,
                         rngs=rngs)


class FeedForward(nnx.Module):
    """w2(dropout(gelu(w1 x))), or the GLU variant gelu(a) * b; exact (erf) GELU as torch."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0, glu: bool = False,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.glu = glu
        self.w1 = linear(dim, dim * mult * (2 if glu else 1), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.w2 = linear(dim * mult, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)

    def __call__(self, x: Float[Array, "b t d"], rngs: nnx.Rngs | None = None) -> Float[Array, "b t d"]:
        hidden = self.w1(x)
        if self.glu:
            hidden, gate = jnp.split(hidden, 2, axis=-1)
            hidden = jax.nn.gelu(hidden, approximate=False) * gate
        else:
            hidden = jax.nn.gelu(hidden, approximate=False)
        return self.w2(self.dropout(hidden, rngs=rngs))


class GRUGate(nnx.Module):
    """`torch.nn.GRUCell(input=y, hidden=x)` with its six bias vectors (gate order r, z, n).

    `nnx.GRUCell` has no separate hidden bias of the candidate (`b_hn`), so it is written out.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        init = _uniform(1.0 / dim**0.5)
        self.input_kernel = nnx.Param(init(rngs.params(), (dim, 3 * dim), param_dtype))
        self.hidden_kernel = nnx.Param(init(rngs.params(), (dim, 3 * dim), param_dtype))
        self.input_bias = nnx.Param(init(rngs.params(), (3 * dim,), param_dtype))
        self.hidden_bias = nnx.Param(init(rngs.params(), (3 * dim,), param_dtype))
        self.dtype = dtype

    def __call__(self, y: Float[Array, "... d"], x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        params = (self.input_kernel, self.hidden_kernel, self.input_bias, self.hidden_bias)
        input_kernel, hidden_kernel, input_bias, hidden_bias = (p[...].astype(self.dtype) for p in params)
        gates_in = dense(y.astype(self.dtype), input_kernel) + input_bias
        gates_hidden = dense(x.astype(self.dtype), hidden_kernel) + hidden_bias
        in_r, in_z, in_n = jnp.split(gates_in, 3, axis=-1)
        hid_r, hid_z, hid_n = jnp.split(gates_hidden, 3, axis=-1)
        reset = jax.nn.sigmoid(in_r + hid_r)
        update = jax.nn.sigmoid(in_z + hid_z)
        candidate = jnp.tanh(in_n + reset * hid_n)
        return (1 - update) * candidate + update * x.astype(self.dtype)


class LowRank(nnx.Module):
    """Linear(din, k) then Linear(k, dout): mogrifier's factorised projection."""

    def __init__(self, dim: int, rank: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.down = linear(dim, rank, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.up = linear(rank, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(self.down(x))


class Mogrifier(nnx.Module):
    """Mogrifier (mogrifier 0.0.5, `factorize_k = dim // 4`): inputs and hiddens gate each other."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        rank = dim // 4
        self.Q = LowRank(dim, rank, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.R = LowRank(dim, rank, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, inputs: jax.Array, hiddens: jax.Array) -> tuple[jax.Array, jax.Array]:
        for step in range(MOGRIFIER_ITERS):
            if step % 2 == 0:
                inputs = 2 * jax.nn.sigmoid(self.Q(hiddens)) * inputs
            else:
                hiddens = 2 * jax.nn.sigmoid(self.R(inputs)) * hiddens
        return inputs, hiddens


class ConvCompress(nnx.Module):
    """Conv1d(dim, dim, kernel=stride=ratio) applied to pre-cut windows of `ratio` slots."""

    def __init__(self, dim: int, ratio: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        bound = 1.0 / (dim * ratio) ** 0.5
        self.kernel = nnx.Param(_uniform(bound)(rngs.params(), (ratio, dim, dim), param_dtype))  # (r, in, out)
        self.bias = nnx.Param(_uniform(bound)(rngs.params(), (dim,), param_dtype))
        self.dtype = dtype

    def __call__(self, windows: Float[Array, "b n r d"]) -> Float[Array, "b n d"]:
        kernel = self.kernel[...].astype(self.dtype)
        out = jnp.einsum("bnri,rio->bno", windows.astype(self.dtype), kernel)  # [b, n, d]
        return out + self.bias[...].astype(self.dtype)


def masked_softmax(logits: Float[Array, "*lead k"], valid: Bool[Array, "*#lead k"]) -> Float[Array, "*lead k"]:
    """Softmax in (at least) float32 where `valid == False` entries get exactly zero weight.

    A row with no valid entry gives all zeros (torch's softmax over an empty axis
    followed by a matmul gives zeros too).
    """
    logits = logits.astype(wide(logits.dtype))
    masked = jnp.where(valid, logits, -jnp.inf)
    peak = jnp.max(masked, axis=-1, keepdims=True, initial=-jnp.inf)
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    weights = jnp.exp(masked - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)
