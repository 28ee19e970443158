"""Peak host memory of one framework's training step, measured in a fresh subprocess.

The child reads VmHWM from `/proc/self/status` after resetting it (`clear_refs`), so
imports, model setup and (for JAX) compilation are not counted: the parent passes its
compiled step in serialised form. The child imports only its own framework's side
(`jax_side` or `torch_side`), after `configure_host`, so the other framework's memory is
not counted and its baseline is measured after the imports.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ct_jax.bench.common import BenchConfig, configure_host


def vm_status_mib(field: str) -> float:
    """A `/proc/self/status` memory field (VmHWM, VmRSS) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def release_free_heap() -> None:
    """Returns freed heap pages to the OS (glibc `malloc_trim`), so RSS counts live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may include freed heap
        pass


def measure_peak_memory(framework: str, bench: BenchConfig, device: str, threads: int,
                        executable: Path | None = None, timeout: float = 900) -> dict[str, float]:
    """Peak memory of training steps of `framework`, measured in a fresh subprocess.

    `peak_rss_mib` is the process's VmHWM over a warm-up and a timed step; `step_mib` is
    that minus the RSS after importing the framework (and starting the JAX runtime): the
    model, optimizer state, activations and, for JAX, the compiled program. For JAX,
    `executable` is the train step serialised by the parent (so the child does not
    compile again, and the compiler's memory is not counted).
    """
    spec = dict(framework=framework, bench=bench.to_json(), device=device, threads=threads,
                executable=str(executable) if executable else None)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "ct_jax.bench.peak_memory", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child for {framework} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_memory_child(spec: dict[str, Any]) -> dict[str, float]:
    """Peak RSS over two training steps (warm-up included), reset after setup; see measure_peak_memory."""
    bench = BenchConfig(**spec["bench"])
    configure_host(spec["device"], spec["threads"])
    # Imports first (one framework only, after configure_host), then the baseline.
    if spec["framework"] == "jax":
        import jax

        from ct_jax.bench.jax_side import JaxSide

        jax.devices()  # the runtime's own memory counts as baseline
        baseline = vm_status_mib("VmRSS")
        side = JaxSide(bench, spec["device"], state_dict=None)
        step = side.load_train_step(Path(spec["executable"]))
    else:
        from ct_jax.bench.torch_side import TorchSide

        if spec["framework"] == "upstream":
            import compressive_transformer_pytorch  # noqa: F401

        baseline = vm_status_mib("VmRSS")
        side = TorchSide(bench, spec["device"], spec["threads"], upstream=spec["framework"] == "upstream")
        step = side.train_step
    release_free_heap()  # loading an XLA executable leaves ~200 MB of freed loader heap resident
    before = vm_status_mib("VmRSS")
    reset_peak_rss()
    step()  # the first step allocates the optimizer state (torch) and the allocators' pools
    step()
    peak = vm_status_mib("VmHWM")
    return dict(peak_rss_mib=peak, baseline_rss_mib=baseline, rss_before_steps_mib=before,
                step_mib=peak - baseline, device_peak_mib=side.device_peak_mib())


if __name__ == "__main__":
    if len(sys.argv) == 2:
        print(json.dumps(_peak_memory_child(json.loads(sys.argv[1]))))
    else:
        raise SystemExit("usage: python -m ct_jax.bench.peak_memory '<json spec>' (internal)")
