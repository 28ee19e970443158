"""Runs and times the benchmark: ct_jax, the PyTorch reference (and upstream 0.4.0 if installed).

Each framework runs the same configuration, weights (the torch model's, converted), batch
and tokens, through its public path:
- training step: JAX `ct_jax.training.make_train_step` (clip 0.5, Adam 1e-4) jitted with
  the state donated; torch `AutoregressiveWrapper(return_loss=True)` with one
  `(loss + aux).backward()` per segment, clip_grad_norm 0.5, Adam 1e-4;
- eval forward: every segment in eval mode (no aux loss), no gradients;
- generation: prime of 128 tokens, 512 new, batch 1, top-k sampling; optionally at other
  seq_len (the reference recomputes its window per token), decoding in bfloat16, at larger
  batches (rows of equal length: the reference's generate takes no ragged batch), each against
  the memory-bandwidth floor of one decoding step (`ct_jax.bench.floor`);
- optionally ct_jax with attention_impl="fused" (column `jax_fused`).
Timings are wall-clock medians of interleaved repetitions (the frameworks alternate, so
a load change on a shared machine hits both), after warm-up, with a synchronisation
before every clock read. Peak host memory is read from `/proc/self/status` (VmHWM) in a
fresh subprocess per framework, reset after warm-up, so that compilation is not counted.
The configs, timing and host setup live in `ct_jax.bench.common`, the report in
`ct_jax.bench.report`, the peak-memory child in `ct_jax.bench.peak_memory`.
Import `ct_jax.bench.common` and call `configure_host` before importing this module (it starts
neither framework, but imports both).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import torch

from ct_jax import flops as flop_count
from ct_jax.bench.common import BenchConfig, batch_primes, interleaved
from ct_jax.bench.decode_profile import decode_profile
from ct_jax.bench.floor import decode_floor, floor_at_batch
from ct_jax.bench.jax_side import JaxSide, jax_matmul_seconds
from ct_jax.bench.peak_memory import measure_peak_memory
from ct_jax.bench.streaming import streaming_overhead
from ct_jax.bench.torch_side import TorchSide, torch_matmul_seconds, upstream_available


@dataclasses.dataclass
class RunOptions:
    """How to run: device, threads, repetitions, which optional rows, where to log."""

    device: str = "cpu"
    threads: int = 1
    reps: int = 3
    warmup: int = 1
    compile_segments: tuple[int, ...] = (2, 8, 32)
    peak_memory: bool = True
    upstream: bool = True
    matmul_sizes: tuple[int, ...] | None = None  # default: 1024, 2048 (CPU); 4096, 8192 (GPU)
    fused: bool = False  # also time ct_jax with attention_impl="fused" (column "jax_fused")
    generation_seq_lens: tuple[int, ...] = ()  # generation rows at these seq_len too (memory scaled alike)
    bf16_generation: bool = True  # a generation row decoding in bfloat16, and its floor
    generation_batches: tuple[int, ...] = (8, 32)  # generation rows at these batch sizes too (b=1 is the first row)
    streaming: bool = True  # the streamed train step against the fixed-window one (first config)
    decode_profile: bool = True  # where a b=1 decoded token's time goes (`ct_jax.bench.decode_profile`)
    log: Callable[[str], Any] = print


def matmul_peaks(device: str, dtype: str, threads: int, reps: int = 5,
                 sizes: tuple[int, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Dense square matmul GFLOP/s per framework, best over a few sizes (the MFU denominator)."""
    sizes = sizes or ((1024, 2048) if device == "cpu" else (4096, 8192))
    out: dict[str, dict[str, Any]] = {}
    for name, timer in (("jax", jax_matmul_seconds), ("torch", torch_matmul_seconds)):
        by_size = {n: 2 * n**3 / timer(n, dtype, device, reps, threads) / 1e9 for n in sizes}
        out[name] = dict(gflops=max(by_size.values()), by_size=by_size)
    return out


def run_config(bench: BenchConfig, options: RunOptions, results_dir: Path, *, generation: bool = True,
               compile_times: bool = True) -> dict[str, Any]:
    """All measurements of one config (generation and compile times optional); a JSON-ready dict."""
    record: dict[str, Any] = dict(config=bench.to_json())
    sides = _sides(bench, options)
    jax_side = sides["jax"]
    options.log(f"[{bench.name}] compiling the JAX train and eval steps")
    record["jax_train_compile_s"] = jax_side.compile_train()
    record["jax_eval_compile_s"] = jax_side.compile_eval()
    if options.fused:
        sides["jax_fused"].compile_train()
        sides["jax_fused"].compile_eval()
    record["flops"] = _flops(bench)
    record.update(_throughput(bench, options, sides))
    if generation:
        record.update(_generation_rows(bench, options, sides))
    if generation and options.streaming:
        options.log(f"[{bench.name}] train step with the memory carried across steps vs fixed windows")
        record["streaming"] = streaming_overhead(bench, options.reps, options.warmup)
    if compile_times and options.compile_segments:
        record["compile"] = {}
        for segments in options.compile_segments:
            options.log(f"[{bench.name}] JAX train step: lower + compile for {segments} segments")
            record["compile"][str(segments)] = jax_side.compile_time(segments)
    if options.peak_memory:
        record["peak_memory"] = _peak_memory(bench, options, jax_side, results_dir)
    return record


def _sides(bench: BenchConfig, options: RunOptions) -> dict[str, Any]:
    """The timed implementations, the torch reference's weights in each: jax, torch (and jax_fused, upstream)."""
    torch_side = TorchSide(bench, options.device, options.threads)
    state_dict = torch_side.state_dict()
    sides: dict[str, Any] = dict(jax=JaxSide(bench, options.device, state_dict), torch=torch_side)
    if options.fused:
        sides["jax_fused"] = JaxSide(bench, options.device, state_dict, attention_impl="fused")
    if options.upstream and upstream_available():
        sides["upstream"] = TorchSide(bench, options.device, options.threads, upstream=True, state_dict=state_dict)
    return sides


def _flops(bench: BenchConfig) -> dict[str, Any]:
    """The model's matrix-product FLOPs per train and eval step, per component and in total (`ct_jax.flops`)."""
    train = flop_count.run_flops(bench.model, bench.batch, bench.segments, training=True)
    evaluation = flop_count.run_flops(bench.model, bench.batch, bench.segments, training=False)
    return dict(train={k: dataclasses.asdict(v) for k, v in train.items()},
                eval={k: dataclasses.asdict(v) for k, v in evaluation.items()},
                train_total=sum(f.total for f in train.values()), eval_total=sum(f.total for f in evaluation.values()))


def _throughput(bench: BenchConfig, options: RunOptions, sides: dict[str, Any]) -> dict[str, Any]:
    """Train and eval steps of every side, interleaved: {"train": ..., "eval": ...}."""
    out = {}
    for kind in ("train", "eval"):
        options.log(f"[{bench.name}] {kind}: {options.reps} interleaved repetitions of {', '.join(sides)}")
        timings = interleaved({name: getattr(side, f"{kind}_step") for name, side in sides.items()},
                              options.reps, options.warmup, sides["torch"].sync)
        out[kind] = {name: dict(timing.to_json(), tokens_per_s=bench.tokens_per_step / timing.median)
                     for name, timing in timings.items()}
    return out


def _generation_rows(bench: BenchConfig, options: RunOptions, sides: dict[str, Any]) -> dict[str, Any]:
    """Generation at batch 1 (and bfloat16, other batches, other seq_len), the floors, the b=1 profile."""
    jax_side, torch_side = sides["jax"], sides["torch"]
    jax_sides = {name: side for name, side in sides.items() if name.startswith("jax")}
    out: dict[str, Any] = dict(generation=_generation(bench, options, jax_sides, torch_side, torch_side.sync))
    out["decode_floor"] = {"float32": decode_floor(jax_side.model, jnp.float32)}
    if options.bf16_generation:
        out["decode_floor"]["bfloat16"] = decode_floor(jax_side.model, jnp.bfloat16)
    for batch in options.generation_batches:
        if batch != 1:
            out.setdefault("generation_batched", {})[str(batch)] = _generation_batched(
                bench, batch, options, jax_side, torch_side, out["decode_floor"]["float32"])
    for seq_len in options.generation_seq_lens:
        if seq_len != bench.model["seq_len"]:
            out.setdefault("generation_at", {})[str(seq_len)] = _generation_at(bench, seq_len, options)
    if options.decode_profile:
        options.log(f"[{bench.name}] decoding profile (batch 1; top-k sampling, then greedy)")
        prime = batch_primes(bench, 1).astype("int32")
        out["decode_profile"] = {name: decode_profile(jax_side.model, prime, bench.generate, temperature=t)
                                 for name, t in (("top_k", 1.0), ("greedy", 0.0))}
    return out


def _peak_memory(bench: BenchConfig, options: RunOptions, jax_side: JaxSide, results_dir: Path) -> dict[str, Any]:
    """Peak host memory of a training step per framework, each in a fresh subprocess (`peak_memory`)."""
    out = {}
    executable = results_dir / f"jax_train_{bench.name}.xla"
    jax_side.save_train_step(executable)
    try:
        for name in ("jax", "torch"):
            options.log(f"[{bench.name}] peak memory of a {name} training step (subprocess)")
            out[name] = measure_peak_memory(name, bench, options.device, options.threads,
                                            executable if name == "jax" else None)
    finally:
        executable.unlink(missing_ok=True)
    return out


def _generation(bench: BenchConfig, options: RunOptions, jax_sides: dict[str, Any], torch_side, sync,
                bf16: bool | None = None) -> dict[str, Any]:
    """Generation timings: each JAX side, bfloat16 decoding (`jax_bf16`) and the torch reference."""
    new = bench.generate
    calls = dict(jax_sides, torch=torch_side)
    calls = {name: side.generate for name, side in calls.items()}
    if options.bf16_generation if bf16 is None else bf16:
        calls["jax_bf16"] = functools.partial(jax_sides["jax"].generate, jnp.bfloat16)
    options.log(f"[{bench.name}] generation ({bench.prime} + {new} tokens, batch 1): {', '.join(calls)}")
    first: dict[str, float] = {}
    for name, call in calls.items():
        if name.startswith("jax"):
            start = time.perf_counter()
            call()  # compiles
            first[name] = time.perf_counter() - start
    # the torch reference recomputes every window: slow, so fewer repetitions there
    timings = interleaved(calls, max(1, min(options.reps, 2)), warmup=0, sync=sync)
    out: dict[str, Any] = {name: dict(t.to_json(), tokens_per_s=new / t.median) for name, t in timings.items()}
    for name, seconds in first.items():
        out[name]["first_call_s"] = seconds
    return out


def _generation_batched(bench: BenchConfig, batch: int, options: RunOptions, jax_side: JaxSide, torch_side: TorchSide,
                        floor: dict[str, float]) -> dict[str, Any]:
    """Generation of `batch` rows (float32 or the config's dtype), JAX against the reference, and the floor of one
    decoding step at that batch."""
    new = bench.generate
    calls = dict(jax=functools.partial(jax_side.generate, batch=batch), torch=functools.partial(torch_side.generate,
                                                                                                  batch=batch))
    options.log(f"[{bench.name}] generation ({bench.prime} + {new} tokens, batch {batch}): {', '.join(calls)}")
    start = time.perf_counter()
    calls["jax"]()  # compiles
    first = time.perf_counter() - start
    # the reference recomputes every window for every row: one repetition
    timings = interleaved(calls, 1, warmup=0, sync=torch_side.sync)
    out: dict[str, Any] = {name: dict(t.to_json(), tokens_per_s=batch * new / t.median) for name, t in timings.items()}
    out["jax"]["first_call_s"] = first
    out["floor"] = floor_at_batch(floor, batch)
    return out


def _scaled(n: int, bench: BenchConfig, seq_len: int) -> int:
    """A memory length `n` of `bench`'s model scaled with its seq_len to `seq_len` (at least 1)."""
    return max(1, n * seq_len // bench.model["seq_len"])


def _generation_at(bench: BenchConfig, seq_len: int, options: RunOptions) -> dict[str, Any]:
    """Generation of `bench`'s model at another `seq_len` (mem_len and cmem_len scaled alike), fresh weights."""
    model = dict(bench.model)
    model.update(seq_len=seq_len, mem_len=_scaled(model.get("mem_len") or bench.model["seq_len"], bench, seq_len))
    if model.get("cmem_len"):
        model["cmem_len"] = _scaled(model["cmem_len"], bench, seq_len)
    variant = dataclasses.replace(bench, name=f"{bench.name}@{seq_len}", model=model, targets={})
    torch_side = TorchSide(variant, options.device, options.threads)
    jax_side = JaxSide(variant, options.device, torch_side.state_dict())
    out = _generation(variant, options, dict(jax=jax_side), torch_side, torch_side.sync, bf16=False)
    out["model"] = model
    return out


def run(configs: list[BenchConfig], options: RunOptions, out_dir: Path,
        per_config: list[dict[str, bool]] | None = None) -> dict[str, Any]:
    """The matmul peaks, then every config; returns the JSON record (files go to a scratch dir in out_dir).

    `per_config[i]` may switch off `generation` / `compile` (compile-time rows) for config i.
    """
    dtype = configs[0].dtype
    if any(c.dtype != dtype for c in configs):
        raise ValueError(f"configs must share a dtype (the matmul peak is measured once), got "
                         f"{ {c.name: c.dtype for c in configs} }")
    if options.device == "gpu":
        try:
            backend = jax.default_backend()
        except RuntimeError as error:  # JAX_PLATFORMS=cuda without a usable CUDA install
            backend = f"none ({error})"
        if backend != "gpu" or not torch.cuda.is_available():
            raise RuntimeError(f"device='gpu' needs a GPU for both frameworks: JAX's backend is {backend!r}, "
                               f"torch.cuda.is_available() is {torch.cuda.is_available()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    options.log(f"measuring the dense matmul peak ({dtype})")
    record: dict[str, Any] = dict(
        machine=machine_info(options), versions=dict(jax=jax.__version__, torch=torch.__version__),
        options=dict(device=options.device, threads=options.threads, reps=options.reps, warmup=options.warmup),
        load_average_start=os.getloadavg(),
        matmul_peak=matmul_peaks(options.device, dtype, options.threads, sizes=options.matmul_sizes),
        configs={},
    )
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        for index, bench in enumerate(configs):
            switches = (per_config or [{}] * len(configs))[index]
            record["configs"][bench.name] = run_config(
                bench, options, Path(scratch), generation=switches.get("generation", True),
                compile_times=switches.get("compile", True))
    record["load_average_end"] = os.getloadavg()
    return record


def machine_info(options: RunOptions) -> dict[str, Any]:
    """The CPU, cores, Python, platform and XLA flags of this run (and the GPU's kind on GPU)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(cpu=cpu, cores_available=len(os.sched_getaffinity(0)), threads_used=options.threads,
                python=platform.python_version(), platform=platform.platform(),
                xla_flags=os.environ.get("XLA_FLAGS", ""))
    if options.device == "gpu":
        info["gpu"] = str(jax.devices()[0].device_kind)
    return info
