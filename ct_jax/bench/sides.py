"""The two sides of a benchmark: ct_jax (JAX) and the PyTorch models, each through its public path.

Every call returns only once its work is done (JAX: `block_until_ready`; torch on CUDA:
`torch.cuda.synchronize`), so the caller's clock reads bracket exactly one unit of work.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from ct_jax.bench.harness import BenchConfig, interleaved, tokens_for

# --------------------------------------------------------------------------- JAX


def _jax_train_step(model, bench: BenchConfig):
    """(step(state, tokens) -> (state, loss), optimizer) of ct_jax's public train path."""
    from ct_jax import training

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

    def __init__(self, bench: BenchConfig, device: str, state_dict: dict[str, Any] | None):
        """`state_dict` None: shapes only, zero weights, so that nothing is computed or compiled
        but the train step (the peak-memory child counts what a step needs, not model init)."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from ct_jax import convert, training
        from ct_jax.model import CompressiveTransformer

        self.bench = bench
        dtype = jnp.bfloat16 if bench.dtype == "bfloat16" else jnp.float32

        def create():
            return CompressiveTransformer(**bench.model, rngs=nnx.Rngs(0), dtype=dtype)

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
        self.compiled_train = self.compiled_eval = None

    def _flat_step(self):
        """The train step over a flat argument list (state leaves, tokens), so it serialises simply."""
        import jax

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
        import jax

        tokens = jax.ShapeDtypeStruct((self.bench.batch, segments * self.bench.model["seq_len"] + 1), jax.numpy.int32)
        return self._timed_compile(*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self._leaves), tokens)[1]

    def compile_train(self) -> dict[str, float]:
        """Compiles the train step for this config's tokens; returns its lower / compile seconds."""
        self.compiled_train, seconds = self._timed_compile(*self._leaves, self.tokens)
        return seconds

    def compile_eval(self) -> float:
        import jax

        start = time.perf_counter()
        self.compiled_eval = jax.jit(self._eval).lower(self._eval_params, self.tokens).compile()
        return time.perf_counter() - start

    def train_step(self) -> None:
        import jax

        out = self.compiled_train(*self._leaves, self.tokens)
        jax.block_until_ready(out)
        self._leaves = list(out[: len(self._leaves)])

    def eval_step(self) -> None:
        import jax

        jax.block_until_ready(self.compiled_eval(self._eval_params, self.tokens))

    def generate(self) -> None:
        import jax

        from ct_jax.generation import generate

        jax.block_until_ready(generate(self.model, self._prime, self.bench.generate, jax.random.key(0)))

    def save_train_step(self, path: Path) -> None:
        """Serialises the compiled train step, for the peak-memory child.

        Pickled (the executable's pytree structure needs it): only this run's own scratch
        file is ever unpickled, never a user's file.
        """
        from jax.experimental import serialize_executable

        path.write_bytes(pickle.dumps(serialize_executable.serialize(self.compiled_train)))

    def load_train_step(self, path: Path):
        """The train step of `save_train_step`, as a call (this side's state and tokens)."""
        from jax.experimental import serialize_executable

        self.compiled_train = serialize_executable.deserialize_and_load(*pickle.loads(path.read_bytes()))
        return self.train_step

    @staticmethod
    def device_peak_mib() -> float | None:
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return None
        return (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**20


def jax_matmul_seconds(n: int, dtype: str, device: str, reps: int, threads: int) -> float:
    """Median seconds of one (n, n) @ (n, n) product in JAX."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.dtype(dtype)) for k in keys)
    matmul = jax.jit(jnp.matmul)
    return interleaved(dict(jax=lambda: matmul(a, b).block_until_ready()), reps, settle_s=0)["jax"].median


# --------------------------------------------------------------------------- torch


class TorchSide:
    """ct_torch_ref (or the upstream package) through AutoregressiveWrapper, with Adam."""

    def __init__(self, bench: BenchConfig, device: str, threads: int, *, upstream: bool = False,
                 state_dict: dict[str, Any] | None = None):
        import torch

        if upstream:
            import compressive_transformer_pytorch as lib
        else:
            import ct_torch_ref as lib
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.bench = bench
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.model = lib.CompressiveTransformer(**bench.model)
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.model.to(self.device).train()
        self.wrapper = lib.AutoregressiveWrapper(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        tokens = tokens_for(bench)
        self.tokens = torch.from_numpy(tokens).to(self.device)
        self.prime = torch.from_numpy(np.ascontiguousarray(tokens[:1, : bench.prime])).to(self.device)
        # bfloat16: autocast on the forward (parameters and optimizer stay float32)
        self._autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=bench.dtype == "bfloat16")

    def state_dict(self) -> dict[str, Any]:
        return {key: value.detach().cpu().clone() for key, value in self.model.state_dict().items()}

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self) -> None:
        import torch

        segments = self.wrapper(self.tokens, return_loss=True)
        while True:
            with torch.autocast(**self._autocast):
                out = next(segments, None)  # forward of the next segment
            if out is None:
                break
            (out.loss + out.aux_loss).sum().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.5)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()

    def eval_step(self) -> None:
        import torch

        self.model.eval()
        try:
            with torch.no_grad(), torch.autocast(**self._autocast):
                for _ in self.wrapper(self.tokens, return_loss=True):
                    pass
        finally:
            self.model.train()
        self.sync()

    def generate(self) -> None:
        import torch

        torch.manual_seed(0)
        with torch.autocast(**self._autocast):
            self.wrapper.generate(self.prime, self.bench.generate)
        self.sync()

    def device_peak_mib(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None


def torch_matmul_seconds(n: int, dtype: str, device: str, reps: int, threads: int) -> float:
    """Median seconds of one (n, n) @ (n, n) product in torch."""
    import torch

    torch.set_num_threads(threads)
    target = torch.device("cuda" if device == "gpu" else "cpu")
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(target, getattr(torch, dtype)) for _ in range(2))
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    return interleaved(dict(torch=lambda: a @ b), reps, sync=sync, settle_s=0)["torch"].median
