"""Data parallelism (`pmap`, or `jit` over a device `Mesh`), sharded parameters (`fsdp`) and multi-host start-up.

The batch, and with it the memory carry, is split along the batch axis `data`. Parameters
and optimizer state are replicated, except in `fsdp` mode, where `ct_jax.sharding`'s rule
table splits them over the same axis. A `DataParallel` places states and batches for its
mode and compiles step functions for it, so the training loop is the same for all modes.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ct_jax.sharding import DATA_RULES, FSDP_RULES, batch_axis, tree_shardings

AXIS = "data"  # the batch axis of the mesh, and pmap's axis name

# Environment variables read by `initialize_distributed`, first match wins.
COORDINATOR_ENV = ("CT_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
NUM_PROCESSES_ENV = ("CT_NUM_PROCESSES", "JAX_NUM_PROCESSES")
PROCESS_ID_ENV = ("CT_PROCESS_ID", "JAX_PROCESS_ID")


class Parallel(enum.StrEnum):
    """How a train step uses the devices."""

    NONE = "none"  # one device, plain jit
    PMAP = "pmap"  # jax.pmap over the local devices, gradients averaged with pmean
    JIT = "jit"  # jax.jit over a 1-D Mesh, batch NamedSharding(P('data')); XLA inserts the all-reduce
    FSDP = "fsdp"  # as jit, and parameters + optimizer state split over 'data' too; XLA gathers them per layer


def _env(names: tuple[str, ...], environ: Mapping[str, str]) -> str | None:
    return next((environ[name] for name in names if environ.get(name)), None)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Starts `jax.distributed` when a coordinator is given (argument or env); True if it did.

    Arguments win over the environment (`CT_COORDINATOR_ADDRESS` / `JAX_COORDINATOR_ADDRESS`,
    `CT_NUM_PROCESSES` / `JAX_NUM_PROCESSES`, `CT_PROCESS_ID` / `JAX_PROCESS_ID`). Without
    a coordinator this is a single-process run and nothing is started. Call it before any
    other JAX work. On CPU the cross-process collectives use gloo.
    """
    environ = os.environ if environ is None else environ
    coordinator_address = coordinator_address or _env(COORDINATOR_ENV, environ)
    if coordinator_address is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(
                f"num_processes={num_processes} / process_id={process_id} need a coordinator_address "
                f"(argument or one of {COORDINATOR_ENV})"
            )
        return False
    resolved = []
    arguments = (("num_processes", num_processes, NUM_PROCESSES_ENV), ("process_id", process_id, PROCESS_ID_ENV))
    for name, value, env_names in arguments:
        if value is None:
            text = _env(env_names, environ)
            if text is None:
                raise ValueError(f"{name} is required with a coordinator address: pass it or set one of {env_names}")
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"{name} from the environment must be an int, got {text!r}") from None
        resolved.append(value)
    num_processes, process_id = resolved
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, num_processes={num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def _place_global(x: Any, sharding: NamedSharding) -> jax.Array:
    # Works in multi-process runs too, where `device_put` cannot target remote devices.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _host_copy(x: jax.Array) -> np.ndarray:
    # A whole array on this host: one replica, or the shards gathered from every process.
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class _MeshStep:
    """`fn(state, batch)` jitted on first call, with the shardings of that state's (and output's) structure."""

    def __init__(self, fn: Callable, parallel: DataParallel, donate: tuple[int, ...], compiler_options: dict | None):
        self.fn, self.parallel, self.donate, self.compiler_options = fn, parallel, donate, compiler_options
        self._jitted: Callable | None = None

    def _compiled(self, state: Any, batch: Any) -> Any:
        if self._jitted is None:
            shardings = self.parallel.state_shardings
            outputs = jax.eval_shape(self.fn, state, batch)
            self._jitted = jax.jit(self.fn, in_shardings=(shardings(state), self.parallel.batch_sharding),
                                   out_shardings=shardings(outputs), donate_argnums=self.donate,
                                   compiler_options=self.compiler_options)
        return self._jitted

    def __call__(self, state: Any, batch: Any) -> Any:
        return self._compiled(state, batch)(state, batch)

    def lower(self, state: Any, batch: Any) -> Any:
        return self._compiled(state, batch).lower(state, batch)


class DataParallel:
    """Placement and compilation for one `Parallel` mode over all devices JAX sees."""

    def __init__(self, mode: Parallel | str = Parallel.NONE, devices: Sequence[jax.Device] | None = None):
        """`devices`: a subset to use (none: one device; jit: the mesh's); pmap uses every local device."""
        self.mode = Parallel(mode)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        if devices is not None and (self.mode is Parallel.PMAP or not devices):
            raise ValueError(f"devices must be None (pmap) or a non-empty list (none, jit, fsdp), got {devices!r}")
        if self.mode is Parallel.NONE:
            if self.process_count > 1:
                raise ValueError(f"parallel='none' runs on one device, but this is a {self.process_count}-process run")
            self.devices = list(devices or jax.local_devices())[:1]
        elif self.mode is Parallel.PMAP:
            self.devices = jax.devices()  # pmap runs on the local ones; collectives span all
            local = Mesh(np.asarray(jax.local_devices()), ("pmap",))
            self.stacked = NamedSharding(local, PartitionSpec("pmap"))  # leading axis = local device
        else:
            self.devices = list(devices or jax.devices())
            self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
            self.replicated = NamedSharding(self.mesh, PartitionSpec())
            self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
            self.rules = FSDP_RULES if self.mode is Parallel.FSDP else DATA_RULES

    @property
    def device_count(self) -> int:
        return len(self.devices)

    @property
    def axis_name(self) -> str | None:
        """The collective axis a step function must average over (pmap only)."""
        return AXIS if self.mode is Parallel.PMAP else None

    def memory_sharding(self) -> tuple[NamedSharding, NamedSharding] | None:
        """(buffers, counts) shardings of the memory carry: buffers `(l, b, m, d)` and counts `(b,)` split along b."""
        if self.mode not in (Parallel.JIT, Parallel.FSDP):
            return None
        return NamedSharding(self.mesh, PartitionSpec(None, AXIS)), self.batch_sharding

    def state_shardings(self, state: Any) -> Any:
        """Mesh modes: the sharding of every leaf of a state (or step output) pytree, by its logical axes."""
        return tree_shardings(state, self.mesh, self.rules)

    def check_batch_size(self, batch_size: int, name: str = "batch_size") -> None:
        """Raises ValueError unless the global batch splits evenly over processes and devices."""
        if batch_size % self.device_count:
            raise ValueError(
                f"{name} ({batch_size}) must be divisible by the number of devices ({self.device_count}, "
                f"parallel={self.mode.value})"
            )

    def put_state(self, state: Any) -> Any:
        """A host (or single-device) pytree, replicated as this mode's steps expect it."""
        if self.mode is Parallel.NONE:
            return jax.device_put(state, self.devices[0])
        if self.mode is Parallel.PMAP:
            return jax.device_put(jax.tree_util.tree_map_with_path(self._pmap_stack, state), self.stacked)
        return jax.tree.map(_place_global, state, self.state_shardings(state))

    def _pmap_stack(self, path, x) -> np.ndarray:
        # (local devices, ...): a copy per device, or (arrays with a batch axis) this process's rows split
        x, n = np.asarray(x), jax.local_device_count()
        axis = batch_axis(path, x.ndim)
        if axis is None:
            return np.stack([x] * n)
        rows = x.shape[axis] // self.process_count
        x = np.take(x, np.arange(self.process_index * rows, (self.process_index + 1) * rows), axis=axis)
        return np.stack(np.split(x, n, axis=axis))

    def _pmap_unstack(self, path, x) -> np.ndarray:
        # the inverse of _pmap_stack: one copy, or every device's (and process's) rows joined
        axis = batch_axis(path, x.ndim - 1)
        if axis is None:
            return np.asarray(x[0])
        local = np.concatenate(list(np.asarray(x)), axis=axis)
        if self.process_count == 1:
            return local
        gathered = multihost_utils.process_allgather(np.moveaxis(local, axis, 0), tiled=True)
        return np.moveaxis(np.asarray(gathered), 0, axis)

    def get_state(self, state: Any) -> Any:
        """One whole host copy (numpy) of a placed pytree: for checkpoints and export.

        A real copy: a zero-copy view of a CPU buffer would block donating it to the next
        step, and an asynchronous checkpoint must not see the buffer change under it.
        """
        if self.mode is Parallel.PMAP:
            state = jax.tree_util.tree_map_with_path(self._pmap_unstack, state)
        elif self.mode in (Parallel.JIT, Parallel.FSDP):
            state = jax.tree.map(_host_copy, state)
        return jax.tree.map(lambda x: np.array(x, copy=True), state)

    def put_batch(self, local_batch: Any) -> Any:
        """This process's rows of the global batch (an array or a pytree of arrays, (b_local, ...)), placed."""
        return jax.tree.map(self._put_rows, local_batch)

    def _put_rows(self, local_batch: np.ndarray) -> jax.Array:
        if self.mode is Parallel.NONE:
            return jax.device_put(local_batch, self.devices[0])
        if self.mode is Parallel.PMAP:
            n = jax.local_device_count()
            if local_batch.shape[0] % n:
                raise ValueError(f"local batch of {local_batch.shape[0]} rows does not split over {n} local devices")
            shards = local_batch.reshape(n, local_batch.shape[0] // n, *local_batch.shape[1:])
            return jax.device_put(shards, self.stacked)
        return jax.make_array_from_process_local_data(self.batch_sharding, local_batch)

    def compile(self, fn: Callable, *, donate_state: bool = False,
                compiler_options: dict[str, Any] | None = None) -> Callable:
        """`fn(state, batch) -> (state', outputs)` (or `-> outputs`) compiled for this mode.

        State is argument 0, replicated (fsdp: parameters and optimizer state sharded by
        `state_shardings`); the batch is split along its first axis; outputs that are not
        state are replicated (pmap: on every local device, read them with `get_state`).
        `compiler_options` (XLA debug options) apply to the jit modes; pmap takes XLA_FLAGS only.
        """
        donate = (0,) if donate_state else ()
        if self.mode is Parallel.PMAP:
            return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate)
        if self.mode in (Parallel.JIT, Parallel.FSDP):
            return _MeshStep(fn, self, donate, compiler_options)
        return jax.jit(fn, donate_argnums=donate, compiler_options=compiler_options)

    def get_outputs(self, outputs: Any) -> Any:
        """Host values of a compiled step's replicated outputs (metrics)."""
        return self.get_state(outputs)
