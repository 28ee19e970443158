"""Data parallelism on fake CPU devices, and two processes joined by jax.distributed.

Each case runs in fresh Python processes: the device count is fixed when JAX starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ct_jax import parallel, streams, training
from tests.configs import make_trainer, train_batch
from tests.once import computed_once, shared_folder
from tests.workers.parallel_train import CONFIG, SEEDS, STREAM_SPLIT, STREAM_STARTS

ROOT = Path(__file__).resolve().parent.parent
FAST_XLA_FLAGS = training.xla_flags()  # fast XLA:CPU compiles; pmap takes options only as flags
TIMEOUT = 300


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _start(program: str, env: dict[str, str], log_dir: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    """Starts tests/workers/parallel_train.py's `program` in a fresh interpreter, output to files
    (a full pipe would block the worker, and with it its partner at the jax.distributed shutdown barrier)."""
    stdout, stderr = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.workers.parallel_train", program], env=env, cwd=ROOT,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    return proc, stdout, stderr


def _finished(proc: subprocess.Popen, stdout: Path, stderr: Path, timeout: float = TIMEOUT) -> dict:
    """A worker awaited: its exit status, the JSON object it printed last, its stderr's tail."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return dict(returncode=f"timed out after {timeout}s", stderr=stderr.read_text()[-3000:])
    lines = stdout.read_text().strip().splitlines()
    return dict(returncode=proc.returncode, stderr=stderr.read_text()[-3000:],
                out=json.loads(lines[-1]) if proc.returncode == 0 and lines else None)


def _result(finished: dict, name: str) -> dict:
    """A worker's JSON result, or the test failed with its stderr."""
    assert finished["returncode"] == 0, f"{name} failed ({finished['returncode']}); stderr tail:\n{finished['stderr']}"
    return finished["out"]


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def _assert_same_run(label: str, got: dict, expected: dict, atol: float = 1e-5) -> None:
    for step, (g, e) in enumerate(zip(got["losses"], expected["losses"]), start=1):
        for name in ("loss", "lm", "aux", "grad_norm"):
            assert abs(g[name] - e[name]) <= atol * max(1.0, abs(e[name])), (
                f"{label}: {name} at step {step} is {g[name]!r}, one device gives {e[name]!r}")
    diff = _max_diff(got["params"], expected["params"])
    assert diff <= atol, f"{label}: parameters after {len(got['losses'])} steps differ from one device's by {diff:.3e}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_workers(logs: Path) -> dict[str, dict]:
    """Every worker of this module, started together and awaited: name -> `_finished`."""
    flags = f"{FAST_XLA_FLAGS} --xla_force_host_platform_device_count="
    address = f"127.0.0.1:{_free_port()}"
    started = {}
    try:
        started["8 devices"] = _start("eight_devices", _env(XLA_FLAGS=flags + "8"), logs, "eight")
        for process_id in range(2):
            env = _env(XLA_FLAGS=flags + "2", CT_COORDINATOR_ADDRESS=address, CT_NUM_PROCESSES="2",
                       CT_PROCESS_ID=str(process_id))
            started[f"process {process_id} of 2"] = _start("two_processes", env, logs, f"process{process_id}")
        return {name: _finished(*worker) for name, worker in started.items()}
    finally:
        for proc, _, _ in started.values():  # never leave a worker behind (or waiting for its partner)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> dict[str, dict]:
    """The workers' results, once for the test run (the first test's worker runs them, the other waits)."""
    return computed_once(shared_folder(tmp_path_factory, "parallel"), "workers", _run_workers)


@pytest.fixture(scope="module")
def one_device(workers) -> dict:
    """The same two steps in this process, on one device (the training tests' model and config)."""
    trainer = make_trainer(CONFIG)
    state = trainer.place(trainer.init_state())
    losses = []
    for seed in SEEDS:
        state, metrics = trainer.train_step(state, train_batch(seed))
        losses.append(trainer.metrics(metrics))
    return {"losses": losses, "params": jax.tree.leaves(trainer.host(state).params)}


@pytest.fixture(scope="module")
def one_device_streams(workers) -> dict:
    """The worker's `run_streams` in this process, on one device."""
    config = dataclasses.replace(CONFIG, data_order="streams")
    trainer = make_trainer(config)
    state = trainer.place(trainer.init_state())
    sampler = streams.StreamSampler(STREAM_SPLIT, STREAM_STARTS, trainer.model.config.seq_len, config.n_segments,
                                    config.batch_size, 0)
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, next(sampler))
        losses.append(trainer.metrics(metrics))
    host = trainer.host(state)
    return {"losses": losses, "params": jax.tree.leaves(host.params), "memory": list(host.memory)}


def _assert_same_streams(label: str, got: dict, expected: dict) -> None:
    _assert_same_run(label, got, expected)
    for field, g, e in zip(("mem", "compressed_mem", "mem_valid", "compressed_mem_valid"), got["memory"],
                           expected["memory"]):
        diff = float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(e, np.float64))))
        assert diff <= 1e-5, f"{label}: carried memory.{field} differs from one device's by {diff:.3e}"


def test_streams_on_8_devices_carry_the_same_memory_as_one_device(workers, one_device_streams):
    out = _result(workers["8 devices"], "8-device worker")
    compressed_counts = np.asarray(one_device_streams["memory"][3])
    assert compressed_counts.min() < compressed_counts.max(), f"rows should hold different memory: {compressed_counts}"
    _assert_same_streams("streams, pmap on 8 devices", out["streams pmap"], one_device_streams)
    _assert_same_streams("streams, jit + Mesh on 8 devices", out["streams jit"], one_device_streams)


def test_fsdp_on_8_devices_matches_one_device_with_an_eighth_of_the_state_each(workers, one_device):
    out = _result(workers["8 devices"], "8-device worker")
    _assert_same_run("fsdp on 8 devices", out["fsdp"], one_device)
    for name in ("fsdp_params", "fsdp_params_and_adam"):
        total, per_device, replicated = out[name]
        assert len(per_device) == 8, f"{name}: held by {len(per_device)} devices"
        # every parameter of the tiny model has an axis 8 divides: only scalars (Adam's count) stay whole
        assert max(per_device) <= total / 8 + 64, f"{name}: a device holds {max(per_device)} of {total} bytes"
        assert all("count" in path for path in replicated), f"{name}: replicated arrays {replicated}"


def test_pmap_and_mesh_jit_on_8_devices_match_one_device(workers, one_device):
    out = _result(workers["8 devices"], "8-device worker")
    assert one_device["losses"][0]["aux"] > 0, "the aux path must be exercised"
    _assert_same_run("pmap on 8 devices", out["pmap"], one_device)
    _assert_same_run("jit + Mesh on 8 devices", out["jit"], one_device)
    assert out["memory_sharded"], "the jit step does not constrain the memory carry (l, b, m, d) to split b on 'data'"


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(workers):
    """Two processes x 2 CPU devices, jax.distributed over 127.0.0.1, against one process's 4-device mesh."""
    expected = _result(workers["8 devices"], "8-device worker")["jit on 4 devices"]
    for process_id in range(2):
        got = _result(workers[f"process {process_id} of 2"], f"process {process_id} of 2")
        _assert_same_run(f"process {process_id} of 2 (2 devices each)", got, expected)
        _assert_same_streams(f"streams, process {process_id} of 2", got["streams"],
                             _result(workers["8 devices"], "8-device worker")["streams jit on 4 devices"])


def test_initialize_distributed_reads_arguments_then_environment():
    assert parallel.initialize_distributed(environ={}) is False, "no coordinator: a single-process run"
    with pytest.raises(ValueError, match=r"num_processes is required .*CT_NUM_PROCESSES"):
        parallel.initialize_distributed(environ={"CT_COORDINATOR_ADDRESS": "127.0.0.1:1234"})
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=2\), got 2"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 2, environ={})
    with pytest.raises(ValueError, match="process_id from the environment must be an int, got 'x'"):
        parallel.initialize_distributed(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                                 "JAX_PROCESS_ID": "x"})
    with pytest.raises(ValueError, match="need a coordinator_address"):
        parallel.initialize_distributed(num_processes=2, process_id=1, environ={})


def test_batch_must_split_over_the_devices():
    data_parallel = parallel.DataParallel("none")
    data_parallel.check_batch_size(3)  # one device: any batch
    with pytest.raises(ValueError, match="devices must be None"):
        parallel.DataParallel("pmap", jax.devices())
    with pytest.raises(ValueError, match=r"'sharded' is not a valid Parallel"):
        parallel.DataParallel("sharded")
