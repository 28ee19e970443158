"""The pieces every benchmark module shares: configs (with their targets), host setup, timing, tokens.

A leaf module: it imports neither JAX nor torch nor another `ct_jax.bench` module, so
`configure_host` can run before either framework starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

DEVICES = ("cpu", "gpu")
TARGET_KINDS = ("train", "eval", "generation", "compile", "memory", "train_mfu")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A benchmark case: model kwargs, batch, segments per step, compute dtype and targets.

    `targets[device][kind]` is the bound the report checks, for kinds in TARGET_KINDS:
    train / eval / generation: JAX's speed-up over ct_torch_ref (at least); compile: the
    compile time of the last compile-segment count over the first's (at most); memory: JAX's
    train-step memory over ct_torch_ref's (at most); train_mfu: JAX's fraction of the matmul
    peak (at least). A config without targets reports measurements only.
    """

    name: str
    model: Mapping[str, Any]
    batch: int
    segments: int = 4
    dtype: str = "float32"  # compute dtype; parameters stay float32 (torch: autocast)
    prime: int = 128
    generate: int = 512
    targets: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("batch", "segments", "prime", "generate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.targets, Mapping):
            raise TypeError(f"targets must be a mapping of device to {{kind: bound}}, got {self.targets!r}")
        for device, bounds in self.targets.items():
            if device not in DEVICES or not isinstance(bounds, Mapping):
                raise ValueError(f"targets must map a device in {DEVICES} to {{kind: bound}}, got {device!r}: "
                                 f"{bounds!r}")
            unknown = sorted(set(bounds) - set(TARGET_KINDS))
            if unknown:
                raise ValueError(f"targets[{device!r}] has unknown kinds {unknown}; expected some of {TARGET_KINDS}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens one training step consumes (batch x segments x seq_len)."""
        return self.batch * self.segments * self.model["seq_len"]

    def to_json(self) -> dict[str, Any]:
        """The fields as plain JSON values (BenchConfig(**to_json()) rebuilds the config)."""
        out = dataclasses.asdict(self)
        out["model"] = dict(self.model)
        out["targets"] = {device: dict(bounds) for device, bounds in self.targets.items()}
        return out


def _model(dim: int, depth: int, seq_len: int, cmem_len: int, heads: int, memory_layers) -> dict[str, Any]:
    return dict(num_tokens=256, dim=dim, depth=depth, seq_len=seq_len, mem_len=seq_len, cmem_len=cmem_len,
                cmem_ratio=4, heads=heads, memory_layers=list(memory_layers))


# The project's targets: CPU on S and M (float32), GPU on L (bfloat16).
_CPU_TARGETS = dict(train=1.0, eval=1.0, generation=10.0, compile=1.3)
_GPU_TARGETS = dict(train=1.5, train_mfu=0.40)
CONFIGS: dict[str, BenchConfig] = {
    "S": BenchConfig("S", _model(256, 4, 128, 32, 4, [3, 4]), batch=4,
                     targets=dict(cpu=_CPU_TARGETS, gpu=_GPU_TARGETS)),
    "M": BenchConfig("M", _model(512, 8, 256, 64, 8, [6, 7, 8]), batch=2,
                     targets=dict(cpu=dict(_CPU_TARGETS, train_mfu=0.70, memory=1.0), gpu=_GPU_TARGETS)),
    "L": BenchConfig("L", _model(1024, 16, 512, 128, 16, range(9, 17)), batch=16, dtype="bfloat16",
                     targets=dict(cpu=_CPU_TARGETS, gpu=_GPU_TARGETS)),
}


def parse_config(spec: str) -> BenchConfig:
    """A named config (S, M, L), a JSON object or the path of a JSON file with BenchConfig's fields.

    A JSON config has only the targets it states, whatever its name.
    """
    if spec in CONFIGS:
        return CONFIGS[spec]
    text = Path(spec).read_text() if not spec.lstrip().startswith("{") and Path(spec).is_file() else spec
    try:
        fields = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(
            f"config must be one of {sorted(CONFIGS)}, a JSON object or a JSON file, got {spec!r}"
        ) from None
    if not isinstance(fields, dict) or "model" not in fields or "batch" not in fields:
        raise ValueError(f"a JSON config needs at least 'model' (kwargs) and 'batch', got {fields!r}")
    fields.setdefault("name", "custom")
    return BenchConfig(**fields)


def configure_host(device: str, threads: int | None) -> int:
    """Pins the process to `threads` cores before JAX starts; returns the thread count.

    XLA's CPU thread pool is sized from the process's CPU affinity when the backend
    starts, and torch gets `torch.set_num_threads(threads)`, so both use the same cores.
    """
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    elif device == "gpu":
        os.environ.setdefault("JAX_PLATFORMS", "cuda")
    else:
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    cpus = sorted(os.sched_getaffinity(0))
    threads = len(cpus) if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= len(cpus):
        raise ValueError(f"threads must be an int in [1, {len(cpus)}] (cores available), got {threads!r}")
    os.sched_setaffinity(0, cpus[:threads])
    return threads


@dataclasses.dataclass
class Timing:
    """Seconds per call over repetitions."""

    samples: list[float]

    @property
    def median(self) -> float:
        """The median of the samples, in seconds."""
        return statistics.median(self.samples)

    def to_json(self) -> dict[str, Any]:
        """Median, min, max and every sample."""
        return dict(median=self.median, min=min(self.samples), max=max(self.samples), samples=self.samples)


def interleaved(calls: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None, settle_s: float = 0.25) -> dict[str, Timing]:
    """Times each call `reps` times, alternating frameworks (order reversed every repetition).

    Every call must return only after its work is done (each side synchronises inside).
    `settle_s` of idle before each timed call lets the other framework's worker threads
    (OpenMP spin-waits, XLA's pool) go to sleep, so they do not steal the cores.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            sync()
            time.sleep(settle_s)
            start = time.perf_counter()
            calls[name]()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(values) for name, values in samples.items()}


def batch_primes(bench: BenchConfig, batch: int, seed: int = 1) -> np.ndarray:
    """The (batch, prime) int64 primes of a batched generation row, the same for every framework."""
    return np.random.default_rng(seed).integers(0, bench.model["num_tokens"], (batch, bench.prime))


def tokens_for(bench: BenchConfig, segments: int | None = None, seed: int = 0) -> np.ndarray:
    """The (batch, segments * seq_len + 1) int64 tokens every framework gets."""
    length = (segments or bench.segments) * bench.model["seq_len"] + 1
    return np.random.default_rng(seed).integers(0, bench.model["num_tokens"], (bench.batch, length))
