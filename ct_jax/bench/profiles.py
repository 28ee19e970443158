"""Where a training step spends its time, per framework: the reference under `torch.profiler`, ct_jax
under `jax.profiler` (a Perfetto trace of the XLA ops, summed per kind of op: `dot.12` and
`dot.40` are one row), both grouped into the same categories.

Import `ct_jax.bench.common` and call `configure_host` first (as for `ct_jax.bench.harness`).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import torch

from ct_jax.bench.common import BenchConfig
from ct_jax.bench.jax_side import JaxSide
from ct_jax.bench.torch_side import TorchSide

# Categories by op name (first match wins): torch aten ops and XLA CPU op / fusion names.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("mm", "bmm", "addmm", "matmul", "linear", "dot", "conv", "gemm", "ynn", "xnn", "onednn")),
    ("norm", ("layer_norm",)),
    ("softmax", ("softmax",)),
    ("optimizer", ("adam", "_foreach", "clip_grad", "norm_")),
    ("copies, transposes, pads", ("copy", "transpose", "pad", "cat", "clone", "contiguous", "slice", "index",
                                  "gather", "scatter", "concatenate", "dynamic", "roll", "stack", "bitcast")),
    ("reductions", ("sum", "reduce", "mean", "max", "min")),
    ("elementwise", ("add", "mul", "sub", "div", "sigmoid", "tanh", "gelu", "exp", "where", "fill", "zero",
                     "loop", "fusion", "erf", "pow", "sqrt", "rsqrt", "neg", "masked", "dropout")),
)


def category(name: str) -> str:
    """The category of an op name (lower-cased substring match), "other" if none."""
    lowered = name.lower()
    for label, keys in CATEGORIES:
        if any(key in lowered for key in keys):
            return label
    return "other"


def torch_train_profile(bench: BenchConfig, threads: int) -> dict[str, Any]:
    """One ct_torch_ref train step (after a warm-up) under torch.profiler: every op's self CPU
    time (ms) and call count, the step's wall time, and the totals per category."""
    side = TorchSide(bench, "cpu", threads)
    side.train_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        side.train_step()
    ops = [dict(name=e.key, self_ms=e.self_cpu_time_total / 1e3, calls=e.count) for e in prof.key_averages()]
    return _summary(ops)


def jax_train_profile(bench: BenchConfig, device: str = "cpu") -> dict[str, Any]:
    """One compiled ct_jax train step (after a warm-up) under jax.profiler: each XLA op's time
    on the host threads (ms, from the Perfetto trace) and count, and the totals per category."""
    side = JaxSide(bench, device, TorchSide(bench, device, 1).state_dict())
    side.compile_train()
    side.train_step()
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            side.train_step()
        trace_file = next(Path(folder).rglob("*.json.gz"))
        with gzip.open(trace_file) as stream:
            events = json.load(stream)["traceEvents"]
    names = {(e.get("pid"), e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    longest: dict[str, tuple[float, str]] = {}
    for event in events:
        thread = names.get((event.get("pid"), event.get("tid")), "")
        # XLA's CPU ops run on the compute threads (not the Python thread, not the profiler's own)
        if event.get("ph") == "X" and "dur" in event and "python" not in thread.lower() and _is_xla_op(event):
            kind = re.sub(r"\.\d+$", "", event["name"])  # dot.1448 -> dot: one row per kind of op
            totals[kind][0] += event["dur"] / 1e3
            totals[kind][1] += 1
            if event["dur"] > longest.get(kind, (0.0, ""))[0]:
                longest[kind] = (event["dur"], str(event.get("args", {}).get("long_name", ""))[:300])
    ops = [dict(name=name, self_ms=ms, calls=count, longest=longest[name][1]) for name, (ms, count) in totals.items()]
    return _summary(ops)


def _is_xla_op(event: dict[str, Any]) -> bool:
    """An op of the compiled program (the trace also holds runtime and Python events)."""
    args = event.get("args", {})
    return "hlo_op" in args or "hlo_module" in args or "long_name" in args


def _summary(ops: list[dict[str, Any]]) -> dict[str, Any]:
    ops = sorted(ops, key=lambda op: op["self_ms"], reverse=True)
    by_category: dict[str, float] = collections.defaultdict(float)
    for op in ops:
        by_category[category(op["name"])] += op["self_ms"]
    return dict(ops=ops, total_ms=sum(op["self_ms"] for op in ops), by_category=dict(by_category))


def markdown(profiles: dict[str, dict[str, Any]], top: int = 15) -> str:
    """A table of the categories (ms and share per framework), then each framework's top ops."""
    labels = list(profiles)
    categories = sorted({c for p in profiles.values() for c in p["by_category"]},
                        key=lambda c: -max(p["by_category"].get(c, 0.0) for p in profiles.values()))
    lines = ["| category | " + " | ".join(f"{label}, ms (share)" for label in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for name in categories:
        spent = [(p["by_category"].get(name, 0.0), p["total_ms"]) for p in profiles.values()]
        lines.append(f"| {name} | " + " | ".join(f"{ms:,.0f} ({100 * ms / total:.0f}%)" for ms, total in spent) + " |")
    lines.append("| total (op self time) | " + " | ".join(f"{p['total_ms']:,.0f}" for p in profiles.values()) + " |")
    for label, profile in profiles.items():
        lines += ["", f"{label}: top {top} ops by self time", "",
                  "| op | calls | ms | category |", "|---|---:|---:|---|"]
        for op in profile["ops"][:top]:
            lines.append(f"| `{op['name'][:60]}` | {op['calls']} | {op['self_ms']:,.1f} | {category(op['name'])} |")
    return "\n".join(lines)
