"""Training: optax train/eval steps over a functional train state, and the `Trainer` that compiles them.

The model is split once, `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`; a
step merges it back inside the compiled function. Objective = sum over segments of
(LM loss + aux loss), as upstream's per-segment backward, averaged over micro-batches.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from ct_jax._checks import check_float, check_int
from ct_jax._host import to_device
from ct_jax.autoregressive import grads, segment_losses
from ct_jax.config import ModelConfig, documented
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer
from ct_jax.parallel import DataParallel, Parallel
from ct_jax.streams import StreamBatch

LN2 = math.log(2.0)
# XLA:CPU options that cut compile time 2-3x (no LLVM optimisation, classic fusion
# emitters) for a step ~3x slower: for tests and smoke runs, where compiling dominates.
# The one statement of them: `compiler_options` of a jit, or `xla_flags()` for XLA_FLAGS.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def xla_flags(options: dict[str, Any] = FAST_CPU_COMPILE) -> str:
    """XLA options as XLA_FLAGS text (read when JAX starts its backend, so for every compile)."""
    return " ".join(f"--{name}={str(value).lower()}" for name, value in options.items())


class Schedule(enum.StrEnum):
    """Learning-rate schedule; both start with `warmup_steps` of linear warmup from 0."""

    CONSTANT = "constant"
    COSINE = "cosine"  # cosine decay to `learning_rate * final_lr_ratio` at `steps`


class Optimizer(enum.StrEnum):
    """The update rule after clipping."""

    ADAM = "adam"  # upstream's example
    SGD = "sgd"  # plain gradient descent: the update is linear in the gradient (exact-equivalence tests)


class DataOrder(enum.StrEnum):
    """How training rows are drawn."""

    WINDOWS = "windows"  # random windows, every row from empty memory (upstream's example)
    STREAMS = "streams"  # batch_size parallel streams through the documents, memory carried across steps


class TrainingDivergedError(FloatingPointError):
    """A loss far above its running level: the run stops without checkpointing the parameters behind it."""


class NonFiniteLossError(TrainingDivergedError):
    """A train step produced a NaN/Inf loss or gradient; the run stops without saving it."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model (defaults: upstream's example optimiser)."""

    batch_size: int = documented(16, "global rows per step (split over devices and processes), each "
                                 "n_segments * seq_len + 1 tokens")
    n_segments: int = documented(4, "segments of seq_len tokens per row, scanned with the memory as carry")
    micro_batches: int = documented(1, "gradient accumulation: each step runs the batch in this many chunks")
    steps: int = documented(1000, "optimizer updates")
    learning_rate: float = documented(1e-4, "peak learning rate")
    optimizer: Optimizer | str = documented(Optimizer.ADAM, "update rule after clipping (sgd: linear in the gradient)")
    schedule: Schedule | str = documented(Schedule.CONSTANT, "learning-rate schedule")
    warmup_steps: int = documented(0, "linear warmup from 0 (both schedules)")
    final_lr_ratio: float = documented(0.1, "cosine schedule: the final learning rate as a fraction of the peak")
    grad_clip_norm: float = documented(0.5, "global-norm gradient clipping (0: off)")
    dtype: str = documented("float32", "compute dtype; parameters, optimizer state and losses stay float32")
    remat: bool = documented(False, "keep only weight-matmul outputs, recompute attention scores and elementwise "
                             "ops in the backward (less memory, more compute)")
    memory_gradients: bool = documented(False, "backpropagate through the memory carried between a row's segments "
                                        "(the paper's BPTT; memory grows with n_segments, remat helps)")
    seed: int = documented(0, "parameters, dropout and data order")
    parallel: Parallel | str = documented(Parallel.NONE, "how a step uses the devices: one (none), pmap, jit over a "
                                          "device mesh, or fsdp (parameters sharded too); the train command's auto: "
                                          "jit when JAX sees several devices, else none")
    data_order: DataOrder | str = documented(
        DataOrder.WINDOWS, "streams: batch_size streams through the documents, memory carried across steps, "
        "validation over the whole split with memory carried; windows: random windows from empty memory "
        "(upstream's example)")
    eval_every: int = documented(100, "validate every N steps (and at the start and end; 0: only there)")
    eval_batches: int = documented(8, "validation batches per evaluation (data order windows)")
    eval_segments: int = documented(0, "data order streams: periodic validation over this many segments per "
                                    "stream (0: the whole split); the last validation always covers the whole split")
    checkpoint_every: int = documented(100, "checkpoint every N steps (and at the end; 0: only there)")
    keep_checkpoints: int = documented(3, "checkpoints kept, the newest")
    divergence_factor: float = documented(4.0, "stop when a train loss exceeds this multiple of its running median "
                                          "(0: only NaN/Inf stop the run); a checkpoint is written once a loss at its "
                                          "parameters passed this check")

    def __post_init__(self) -> None:
        for name in ("batch_size", "n_segments", "micro_batches", "steps", "eval_batches", "keep_checkpoints"):
            check_int(name, getattr(self, name))
        for name in ("warmup_steps", "seed", "eval_every", "checkpoint_every", "eval_segments"):
            check_int(name, getattr(self, name), 0)
        for name in ("learning_rate", "final_lr_ratio", "grad_clip_norm", "divergence_factor"):
            check_float(name, getattr(self, name), 0.0)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by micro_batches ({self.micro_batches})"
            )
        object.__setattr__(self, "optimizer", Optimizer(self.optimizer))
        object.__setattr__(self, "schedule", Schedule(self.schedule))
        object.__setattr__(self, "parallel", Parallel(self.parallel))
        object.__setattr__(self, "data_order", DataOrder(self.data_order))

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (enums by value), as stored in checkpoints."""
        out = dataclasses.asdict(self)
        for name in ("optimizer", "schedule", "parallel", "data_order"):
            out[name] = getattr(self, name).value
        return out


class TrainState(NamedTuple):
    """The whole mutable state of training, a pytree."""

    params: nnx.State  # the model's nnx.Param values, float32
    opt_state: optax.OptState
    step: Int[Array, ""]  # completed updates
    rng: jax.Array  # raw uint32 key, split once per step (dropout)
    memory: Memory | None = None  # streams: every stream's memory, carried to the next step (global batch)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """The learning rate at each step, from `config.schedule`, warmup included."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if config.schedule is Schedule.COSINE:
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(config.steps, warmup + 1), end_value=peak * config.final_lr_ratio
        )
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then Adam (upstream's example: lr 1e-4, clip 0.5) or SGD."""
    rule = optax.adam if config.optimizer is Optimizer.ADAM else optax.sgd
    update = rule(learning_rate_schedule(config))
    if config.grad_clip_norm == 0:
        return update
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), update)


def create_model(model_config: ModelConfig | dict[str, Any], config: TrainConfig) -> CompressiveTransformer:
    """A fresh model (float32 parameters, `config.dtype` compute) seeded from `config.seed`."""
    if isinstance(model_config, dict):
        model_config = ModelConfig.from_kwargs(model_config)
    return CompressiveTransformer(
        **model_config.to_kwargs(), rngs=nnx.Rngs(config.seed), dtype=config.compute_dtype, param_dtype=jnp.float32
    )


def init_state(model: CompressiveTransformer, optimizer: optax.GradientTransformation, seed: int,
               stream_batch: int | None = None) -> TrainState:
    """The train state at step 0 for the model's current parameters (`stream_batch`: rows of empty memory)."""
    params = nnx.state(model, nnx.Param)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # not the parameters' stream
    memory = Memory.empty(model, stream_batch, model.dtype) if stream_batch is not None else None
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), rng, memory)


def _split(model: CompressiveTransformer, train: bool) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, non-parameter state) of the model in train or eval mode; leaves it in train mode."""
    model.train()
    if not train:
        model.eval()
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    model.train()
    return graphdef, rest


def make_train_step(
    model: CompressiveTransformer,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
    parallel: DataParallel | None = None,
) -> Callable[[TrainState, Int[Array, "b l"]], tuple[TrainState, dict[str, Float[Array, ""]]]]:
    """A pure, uncompiled `step(state, batch) -> (state, metrics)` (compile with `DataParallel.compile`).

    `batch`: a `ct_jax.streams.StreamBatch`, or windows (b, n * seq_len + 1), which are the
    batch `StreamBatch.from_windows` (every row reset before segment 0). One gradient function
    (`ct_jax.autoregressive.grads`) runs both. A state with memory (`config.data_order`
    streams) carries it: the rows continue from `state.memory`, and the step stores the memory
    they end with; the LM loss is then the whole batch's token mean per segment (rows differ in
    padding). Without, every row starts from empty memory and each (micro-)batch segment's LM
    loss is its token mean (upstream's wrapper). metrics, per token (means over segments, nats, as
    validation reports them): loss (the objective lm + aux over n_segments), lm and aux; bpb (lm / ln 2),
    grad_norm (of the summed objective, before clipping), learning_rate.
    A step whose loss or gradient is not finite returns the state unchanged: no NaN reaches the parameters.
    """
    graphdef, rest = _split(model, train=True)
    axis_name = parallel.axis_name if parallel is not None else None
    memory_sharding = parallel.memory_sharding() if parallel is not None else None
    schedule = learning_rate_schedule(config)
    seq_len = model.config.seq_len

    def constrained(memories: Memory) -> Memory:
        if memory_sharding is None:
            return memories
        buffers, counts = memory_sharding  # the carry is split along the batch like the tokens
        usage = None if memories.mem_usage is None else buffers  # (l, b, m): split along b too
        return jax.lax.with_sharding_constraint(memories, Memory(buffers, buffers, counts, counts, usage))

    def step(state: TrainState, batch: jax.Array | StreamBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        key, next_rng = jax.random.split(state.rng)
        if axis_name is not None:  # each device's rows get their own dropout masks
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        net = nnx.merge(graphdef, state.params, rest)
        if not isinstance(batch, StreamBatch):
            batch = StreamBatch.from_windows(batch, seq_len)
        carried = state.memory is not None
        memory = state.memory if carried else constrained(Memory.empty(net, batch.inputs.shape[0], net.dtype))
        result = grads(net, batch, memory, key, micro_batches=config.micro_batches, remat=config.remat,
                       memory_gradients=config.memory_gradients, batch_mean=carried, axis_name=axis_name)
        loss, lm, aux, gradient = result.objective, result.lm_losses, result.aux_losses, result.grads
        memory = constrained(result.memories) if carried else None
        if axis_name is not None:
            loss, lm, aux, gradient = jax.lax.pmean((loss, lm, aux, gradient), axis_name)
        grad_norm = optax.tree.norm(gradient)
        updates, opt_state = optimizer.update(gradient, state.opt_state, state.params)
        updated = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1, next_rng, memory)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        lm_mean = jnp.mean(lm)
        metrics = dict(loss=loss / lm.shape[0], lm=lm_mean, aux=jnp.mean(aux), bpb=lm_mean / LN2, grad_norm=grad_norm,
                       learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
        return new_state, metrics

    return step


def make_eval_step(
    model: CompressiveTransformer, parallel: DataParallel | None = None
) -> Callable[[nnx.State, Int[Array, "b l"]], dict[str, Float[Array, ""]]]:
    """A pure `eval_step(params, tokens) -> {lm, bpb}` in eval mode (no dropout, no aux loss)."""
    graphdef, rest = _split(model, train=False)
    axis_name = parallel.axis_name if parallel is not None else None

    def eval_step(params: nnx.State, tokens: jax.Array) -> dict[str, jax.Array]:
        lm, _, _ = segment_losses(nnx.merge(graphdef, params, rest), tokens)
        lm = jnp.mean(lm)
        if axis_name is not None:
            lm = jax.lax.pmean(lm, axis_name)
        return dict(lm=lm, bpb=lm / LN2)

    return eval_step


# Fields of TrainConfig that only the host loop reads; they do not change a compiled step.
_LOOP_ONLY = dict(seed=0, eval_every=0, eval_batches=1, eval_segments=0, checkpoint_every=0, keep_checkpoints=1,
                  divergence_factor=0.0)


class CompiledSteps(NamedTuple):
    """One configuration's compiled steps and the parallel mode they run in."""

    parallel: DataParallel
    train: Callable  # train_step(state, batch) -> (state, metrics), the state donated
    eval: Callable  # eval_step(params, tokens) -> {lm, bpb}


def _structure(model: CompressiveTransformer) -> tuple[nnx.GraphDef, tuple]:
    """The model's graphdef and the values of its non-parameter state, hashable."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    values = []
    for leaf in jax.tree.leaves(rest):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.asarray(leaf)
        values.append((array.dtype.str, array.shape, array.tobytes()))
    return graphdef, tuple(values)


def step_key(model: CompressiveTransformer, config: TrainConfig, compiler_options: dict[str, Any] | None,
             devices: Sequence[jax.Device] | None) -> tuple:
    """Everything a compiled step depends on, hashable: the model's config and dtype, its structure
    (graphdef) and non-parameter state (the steps hold these as constants: dropout RNG streams,
    anything a subclass adds), the step's settings and the devices. Parameters are the steps'
    arguments, not in the key."""
    step_config = dataclasses.replace(config, **_LOOP_ONLY)
    if config.schedule is Schedule.CONSTANT:  # only the cosine schedule reads `steps`
        step_config = dataclasses.replace(step_config, steps=1)
    return (model.config, jnp.dtype(model.dtype).name, *_structure(model), step_config,
            tuple(sorted((compiler_options or {}).items())), tuple(device.id for device in devices or jax.devices()))


def compile_steps(model: CompressiveTransformer, config: TrainConfig, compiler_options: dict[str, Any] | None,
                  devices: Sequence[jax.Device] | None) -> CompiledSteps:
    """The train and eval steps of `model` and `config`, jitted for `config.parallel` on `devices`."""
    parallel = DataParallel(config.parallel, devices)
    train_step = make_train_step(model, make_optimizer(config), config, parallel)
    return CompiledSteps(parallel, parallel.compile(train_step, donate_state=True, compiler_options=compiler_options),
                         parallel.compile(make_eval_step(model, parallel), compiler_options=compiler_options))


class StepCache:
    """Compiled steps by `step_key`, the `size` most recently used kept (least recent dropped first).

    Repeated `Trainer`s / `fit` calls in one process (notebooks, tests) reuse the compiled
    executables instead of tracing fresh closures. `SHARED_STEPS` is the one every `Trainer`
    uses unless given another (or None: compile afresh).
    """

    def __init__(self, size: int = 8):
        self.size = check_int("size", size)
        self._entries: collections.OrderedDict[tuple, CompiledSteps] = collections.OrderedDict()

    def get(self, model: CompressiveTransformer, config: TrainConfig, compiler_options: dict[str, Any] | None,
            devices: Sequence[jax.Device] | None) -> CompiledSteps:
        """The cached steps of this key, compiled (and stored) on first use."""
        key = step_key(model, config, compiler_options, devices)
        if key not in self._entries:
            self._entries[key] = compile_steps(model, config, compiler_options, devices)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


SHARED_STEPS = StepCache()  # the process's compiled steps, shared by every Trainer by default


class Trainer:
    """Compiled train and eval steps for one model and config, on `config.parallel`'s devices.

    States and metrics cross this boundary as host values; placed states stay opaque.
    `compiler_options` are XLA options for the jit modes (e.g. FAST_CPU_COMPILE); `devices`
    a subset of the devices (parallel none / jit), by default all. `step_cache`: where compiled
    steps are shared (default `SHARED_STEPS`, the process's; None: compile this trainer's own).
    """

    def __init__(self, model: CompressiveTransformer, config: TrainConfig, *,
                 compiler_options: dict[str, Any] | None = None, devices: Sequence[jax.Device] | None = None,
                 step_cache: StepCache | None = SHARED_STEPS):
        self.model, self.config = model, config
        if jnp.dtype(model.dtype) != jnp.dtype(config.compute_dtype):
            raise ValueError(f"model computes in {jnp.dtype(model.dtype).name}, but config.dtype is {config.dtype!r}")
        get = step_cache.get if step_cache is not None else compile_steps
        self.parallel, self._train, self._eval = get(model, config, compiler_options, devices)
        self.parallel.check_batch_size(config.batch_size)
        per_device = config.batch_size // self.parallel.device_count
        if per_device % config.micro_batches:
            raise ValueError(
                f"batch_size per device ({per_device} = {config.batch_size} / {self.parallel.device_count} devices) "
                f"must be divisible by micro_batches ({config.micro_batches})"
            )
        self.optimizer = make_optimizer(config)

    @property
    def window(self) -> int:
        """Tokens per row: `n_segments * seq_len + 1`."""
        return self.config.n_segments * self.model.config.seq_len + 1

    @property
    def streaming(self) -> bool:
        return self.config.data_order is DataOrder.STREAMS

    def init_state(self) -> TrainState:
        """Step 0 on the host: fresh parameters and optimizer state (streams: empty memory for every row)."""
        stream_batch = self.config.batch_size if self.streaming else None
        return jax.device_get(init_state(self.model, self.optimizer, self.config.seed, stream_batch))

    def place(self, state: TrainState) -> TrainState:
        return self.parallel.put_state(state)

    def host(self, placed: TrainState) -> TrainState:
        return self.parallel.get_state(placed)

    def train_step(
        self, placed: TrainState, local_batch: np.ndarray | StreamBatch
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update on this process's rows; metrics stay on device (read with `metrics`)."""
        return self._train(placed, self.parallel.put_batch(local_batch))

    def metrics(self, device_metrics: dict[str, jax.Array]) -> dict[str, float]:
        return {key: float(value) for key, value in self.parallel.get_outputs(device_metrics).items()}

    def evaluate(self, placed: TrainState, batches: Iterator[np.ndarray]) -> float:
        """Mean validation bits per byte over global batches (this process takes its rows)."""
        parallel, values = self.parallel, []
        for batch in batches:
            local = batch.shape[0] // parallel.process_count
            rows = batch[parallel.process_index * local : (parallel.process_index + 1) * local]
            values.append(self._eval(placed.params, parallel.put_batch(rows))["bpb"])
        if not values:
            raise ValueError("evaluation got no batches")
        return float(np.mean([float(np.asarray(parallel.get_outputs(v))) for v in values]))

    def load_params(self, params: nnx.State) -> CompressiveTransformer:
        """The model with host `params` loaded (in place), e.g. for export or sampling."""
        nnx.update(self.model, jax.tree.map(to_device, params))
        return self.model
