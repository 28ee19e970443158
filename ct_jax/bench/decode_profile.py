"""Where a decoded token's time goes: the compiled decoding loop under `jax.profiler`, each XLA op's time
charged to the part of the loop that emitted it (the `jax.named_scope`s of `ct_jax.generation`, `ct_jax.sampling`
and the model's layers, read from the optimized HLO's op names: `generation.decode_program`), beside the
wall time per token and the bandwidth floor.

The traced wall time not covered by any op is the runtime's own: launching each op, the loops' conditions
and branch dispatch. Import `ct_jax.bench.common` and call `configure_host` first.
"""

from __future__ import annotations

import collections
import functools
import gzip
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ct_jax.generation import decode, decode_program
from ct_jax.model import CompressiveTransformer

# the loop's parts (ct_jax.generation: a window's full forward, a call through the cache, drawing and the
# stream's bookkeeping) and the model's (per layer: attention, feed-forward; the output layer)
SCOPES = ("window_forward", "cached_call", "bookkeeping", "sampling", "attention", "feed_forward", "logits")
CONTAINERS = ("while", "conditional", "call")  # ops that only run others: their time is their children's
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][a-z\-]*)\(.*op_name="([^"]*)"')


def op_parts(hlo_text: str) -> dict[str, str]:
    """Each leaf instruction of an optimized HLO module named by the loop's and the model's scopes it ran in
    ("cached_call/attention") and whether it is a matrix product ("matmul") or not ("other")."""
    out = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match or match.group(2) in CONTAINERS:
            continue
        name, opcode, op_name = match.groups()
        scopes = [part for part in op_name.split("/") if part in SCOPES]
        kind = "matmul" if opcode == "dot" or "dot_general" in op_name.rsplit("/", 1)[-1] else "other"
        out[name] = f"{'/'.join(dict.fromkeys(scopes)) or 'loop'} ({kind})"
    return out


def traced_op_times(call, hlo_text: str) -> tuple[dict[str, dict[str, float]], float]:
    """Runs `call()` once under jax.profiler: per part (`op_parts`), the ms its XLA ops took and how many
    ran; and the call's wall time in ms."""
    parts = op_parts(hlo_text)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            start = time.perf_counter()
            jax.block_until_ready(call())
            wall_ms = (time.perf_counter() - start) * 1e3
        with gzip.open(next(Path(folder).rglob("*.json.gz"))) as stream:
            events = json.load(stream)["traceEvents"]
    totals: dict[str, dict[str, float]] = collections.defaultdict(lambda: dict(ms=0.0, ops=0))
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and "dur" in event and name in parts:
            totals[parts[name]]["ms"] += event["dur"] / 1e3
            totals[parts[name]]["ops"] += 1
    return dict(totals), wall_ms


def decode_profile(model: CompressiveTransformer, prime: np.ndarray, length: int, reps: int = 3,
                   **kwargs: Any) -> dict[str, Any]:
    """`decode(model, prime, length, **kwargs)`: its ms per token untraced (median of `reps`, after a compile),
    and one traced call's op time per part, per token."""
    rng = jax.random.key(0)
    run = functools.partial(decode, model, prime, length, rng, **kwargs)
    jax.block_until_ready(run())  # compiles
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(run())
        seconds.append(time.perf_counter() - start)
    per_token_ms = float(np.median(seconds)) * 1e3 / length
    totals, traced_ms = traced_op_times(run, decode_program(model, prime, length, rng, **kwargs))
    rows = sorted(((part, t["ms"] / length, t["ops"] / length) for part, t in totals.items()),
                  key=lambda row: -row[1])
    return dict(ms_per_token=per_token_ms, traced_ms_per_token=traced_ms / length,
                ops_ms_per_token=sum(row[1] for row in rows),
                parts=[dict(part=p, ms_per_token=ms, ops_per_token=n) for p, ms, n in rows])
