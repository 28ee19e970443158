"""The JAX side of a benchmark: ct_jax's public train, eval and generation paths on one config.

Every call returns only once its work is done (`block_until_ready`), so the caller's clock
reads bracket exactly one unit of work.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import serialize_executable

from ct_jax import convert, training
from ct_jax.bench.common import BenchConfig, batch_primes, interleaved, tokens_for
from ct_jax.generation import generate
from ct_jax.model import CompressiveTransformer


def _jax_train_step(model, bench: BenchConfig):
    """(step(state, tokens) -> (state, loss), optimizer) of ct_jax's public train path."""
    config = training.TrainConfig(batch_size=bench.batch, n_segments=bench.segments, learning_rate=1e-4,
                                  grad_clip_norm=0.5, dtype=bench.dtype)
    optimizer = training.make_optimizer(config)
    public_step = training.make_train_step(model, optimizer, config)

    def step(state, tokens):
        new_state, metrics = public_step(state, tokens)
        return new_state, metrics["loss"]

    return step, optimizer


class JaxSide:
    """ct_jax's training step (state donated), eval pass and generation on one config."""

    def __init__(self, bench: BenchConfig, device: str, state_dict: dict[str, Any] | None,
                 attention_impl: str = "xla"):
        """`state_dict` None: shapes only, zero weights, so that nothing is computed or compiled
        but the train step (the peak-memory child counts what a step needs, not model init).
        `attention_impl`: the model's attention path ("xla" or "fused")."""
        self.bench = bench
        dtype = jnp.bfloat16 if bench.dtype == "bfloat16" else jnp.float32

        def create():
            return CompressiveTransformer(**bench.model, rngs=nnx.Rngs(0), dtype=dtype, attention_impl=attention_impl)

        self.model = create() if state_dict is not None else nnx.eval_shape(create)
        if state_dict is not None:
            convert.from_torch(state_dict, self.model)
        tokens = tokens_for(bench).astype(np.int32)
        self.tokens = jax.device_put(tokens)
        self._step, optimizer = _jax_train_step(self.model, bench)
        if state_dict is None:
            shapes = jax.eval_shape(lambda params: training.TrainState(
                params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0)),
                nnx.state(self.model, nnx.Param))
            state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
        else:
            state = jax.device_get(training.init_state(self.model, optimizer, 0))
        leaves, self._treedef = jax.tree.flatten(state)
        self._leaves = [jax.device_put(x) for x in leaves]  # donated by every step; the model keeps its own
        self._eval, self._eval_params = training.make_eval_step(self.model), nnx.state(self.model, nnx.Param)
        self._prime = jax.device_put(np.ascontiguousarray(tokens[:1, : bench.prime]))
        self._primes = {1: self._prime}
        self.compiled_train = self.compiled_eval = None

    def _flat_step(self):
        """The train step over a flat argument list (state leaves, tokens), so it serialises simply."""
        n, treedef, step = len(self._leaves), self._treedef, self._step

        def flat(*args):
            new_state, loss = step(jax.tree.unflatten(treedef, args[:n]), args[n])
            return (*jax.tree.leaves(new_state), loss)

        return jax.jit(flat, donate_argnums=tuple(range(n)))

    def _timed_compile(self, *args):
        """(compiled train step, lower / compile / total seconds) for `args` (arrays or shapes)."""
        start = time.perf_counter()
        lowered = self._flat_step().lower(*args)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
        return compiled, dict(lower_s=lowered_at - start, compile_s=done - lowered_at, total_s=done - start)

    def compile_time(self, segments: int) -> dict[str, float]:
        """Seconds to lower and to compile the train step for `segments` segments (fresh trace)."""
        tokens = jax.ShapeDtypeStruct((self.bench.batch, segments * self.bench.model["seq_len"] + 1), jnp.int32)
        return self._timed_compile(*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self._leaves), tokens)[1]

    def compile_train(self) -> dict[str, float]:
        """Compiles the train step for this config's tokens; returns its lower / compile seconds."""
        self.compiled_train, seconds = self._timed_compile(*self._leaves, self.tokens)
        return seconds

    def compile_eval(self) -> float:
        """Compiles the eval pass for this config's tokens; returns the seconds it took."""
        start = time.perf_counter()
        self.compiled_eval = jax.jit(self._eval).lower(self._eval_params, self.tokens).compile()
        return time.perf_counter() - start

    def train_step(self) -> None:
        """One compiled training step (the state's buffers are donated and replaced)."""
        out = self.compiled_train(*self._leaves, self.tokens)
        jax.block_until_ready(out)
        self._leaves = list(out[: len(self._leaves)])

    def eval_step(self) -> None:
        """The compiled eval pass over every segment."""
        jax.block_until_ready(self.compiled_eval(self._eval_params, self.tokens))

    def generate(self, dtype: Any = None, batch: int = 1) -> None:
        """Samples `bench.generate` tokens after the prime (`batch` rows of it: `batch_primes`), decoding in `dtype`
        (None: the model's)."""
        if batch not in self._primes:
            self._primes[batch] = jax.device_put(batch_primes(self.bench, batch).astype(np.int32))
        jax.block_until_ready(generate(self.model, self._primes[batch], self.bench.generate, jax.random.key(0),
                                       dtype=dtype))

    def save_train_step(self, path: Path) -> None:
        """Serialises the compiled train step, for the peak-memory child.

        Pickled (the executable's pytree structure needs it): only this run's own scratch
        file is ever unpickled, never a user's file.
        """
        path.write_bytes(pickle.dumps(serialize_executable.serialize(self.compiled_train)))

    def load_train_step(self, path: Path):
        """The train step of `save_train_step`, as a call (this side's state and tokens)."""
        self.compiled_train = serialize_executable.deserialize_and_load(*pickle.loads(path.read_bytes()))
        return self.train_step

    @staticmethod
    def device_peak_mib() -> float | None:
        """Peak accelerator memory in use, MiB (None on CPU)."""
        device = jax.devices()[0]
        if device.platform == "cpu":
            return None
        return (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**20


def jax_matmul_seconds(n: int, dtype: str, device: str, reps: int, threads: int) -> float:
    """Median seconds of one (n, n) @ (n, n) product in JAX."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.dtype(dtype)) for k in keys)
    matmul = jax.jit(jnp.matmul)
    return interleaved(dict(jax=lambda: matmul(a, b).block_until_ready()), reps, settle_s=0)["jax"].median


