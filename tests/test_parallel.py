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
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from ct_jax import parallel, streams
from tests.test_training import CONFIG as TRAIN_CONFIG
from tests.test_training import MODEL, batch, make_trainer

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (100, 101)  # one batch per step
# Parameters after steps are compared, so the update must be linear in the gradient: under Adam a
# near-zero gradient coordinate flipping sign with the reduction order moves by 2 * lr (tests/tolerances.py).
CONFIG = dataclasses.replace(TRAIN_CONFIG, optimizer="sgd")
# Fast XLA:CPU compiles (see ct_jax.training.FAST_CPU_COMPILE); pmap takes options only here.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
TIMEOUT = 300

# Runs tests/test_training.py's tiny model and step (its second segment compresses, so the
# aux loss is exercised) for two steps on fixed batches; prints the losses and parameters.
WORKER_COMMON = """
import json, re, sys
import numpy as np
import jax
from ct_jax import streams, training

MODEL, CONFIG = json.loads(sys.argv[1]), json.loads(sys.argv[2])

def run(mode, devices=None):
    config = training.TrainConfig(**dict(CONFIG, parallel=mode))
    trainer = training.Trainer(training.create_model(MODEL, config), config, devices=devices)
    state = trainer.place(trainer.init_state())
    local = config.batch_size // jax.process_count()
    losses = []
    for seed in SEEDS:
        window = config.n_segments * MODEL["seq_len"] + 1
        tokens = np.random.default_rng(seed).integers(0, MODEL["num_tokens"], (config.batch_size, window), dtype=np.int32)
        state, metrics = trainer.train_step(state, tokens[jax.process_index() * local : (jax.process_index() + 1) * local])
        losses.append(trainer.metrics(metrics))
    params = [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(trainer.host(state).params)]
    return trainer, {"losses": losses, "params": params}, state


def run_streams(mode, devices=None):
    # three steps of streamed training: this process's streams, the memory carried in the state
    config = training.TrainConfig(**dict(CONFIG, parallel=mode, data_order="streams"))
    trainer = training.Trainer(training.create_model(MODEL, config), config, devices=devices)
    state = trainer.place(trainer.init_state())
    sampler = streams.StreamSampler(STREAM_SPLIT, STREAM_STARTS, MODEL["seq_len"], config.n_segments,
                                    config.batch_size, 0, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, next(sampler))
        losses.append(trainer.metrics(metrics))
    host = trainer.host(state)
    return {"losses": losses, "params": [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(host.params)],
            "memory": [np.asarray(leaf).tolist() for leaf in host.memory]}


def device_bytes(tree):
    # (total bytes of the arrays, bytes each device holds, paths of the replicated arrays)
    total, per_device, replicated = 0, {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        total += leaf.nbytes
        if leaf.sharding.is_fully_replicated:
            replicated.append(jax.tree_util.keystr(path))
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return total, sorted(per_device.values()), replicated
""".replace("SEEDS", repr(SEEDS)).replace("STREAM_SPLIT", "np.random.default_rng(7).integers(0, 256, 3000).astype(np.uint8)").replace(
    "STREAM_STARTS", "np.arange(0, 3000, 13)")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _start(code: str, env: dict[str, str], log_dir: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    """Starts `code` in a fresh interpreter, output to files (a full pipe would block the
    worker, and with it its partner process at the jax.distributed shutdown barrier)."""
    stdout, stderr = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        argv = [json.dumps(MODEL), json.dumps(CONFIG.to_json())]
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, cwd=ROOT, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)
    return proc, stdout, stderr


def _result(proc: subprocess.Popen, stdout: Path, stderr: Path, name: str, timeout: float = TIMEOUT) -> dict:
    """Waits for a worker; returns the JSON object it printed last."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{name} timed out after {timeout}s; stderr tail:\n{stderr.read_text()[-3000:]}")
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}); stderr tail:\n{stderr.read_text()[-3000:]}"
    return json.loads(stdout.read_text().strip().splitlines()[-1])


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


EIGHT_DEVICES = WORKER_COMMON + textwrap.dedent("""
    assert jax.device_count() == 8, jax.devices()
    out = {}
    _, out["pmap"], _ = run("pmap")
    _, out["jit on 4 devices"], _ = run("jit", jax.devices()[:4])  # the two-process test's reference
    _, out["fsdp"], state = run("fsdp")
    out["fsdp_params"] = device_bytes(state.params)  # after the steps: the update keeps them sharded
    adam = training.Trainer(training.create_model(MODEL, training.TrainConfig(**dict(CONFIG, parallel="fsdp"))),
                            training.TrainConfig(**dict(CONFIG, parallel="fsdp", optimizer="adam")))
    placed = adam.place(adam.init_state())
    out["fsdp_params_and_adam"] = device_bytes((placed.params, placed.opt_state))
    out["streams pmap"] = run_streams("pmap")
    out["streams jit"] = run_streams("jit")
    out["streams jit on 4 devices"] = run_streams("jit", jax.devices()[:4])  # the two-process test's reference
    trainer, out["jit"], _ = run("jit")
    # The memory carry is constrained to the batch sharding: (layers, b, slots, dim) split on b.
    tokens = np.zeros((CONFIG["batch_size"], CONFIG["n_segments"] * MODEL["seq_len"] + 1), np.int32)
    hlo = trainer._train.lower(trainer.place(trainer.init_state()), trainer.parallel.put_batch(tokens)).as_text()
    out["memory_sharded"] = bool(re.search(r'sharding_constraint .*\\[\\{\\}, \\{"data"\\}, \\{\\}, \\{\\}\\]', hlo)
                                 or "devices=[1,8,1,1]" in hlo)  # Shardy or GSPMD syntax
    print(json.dumps(out))
""")
TWO_PROCESSES = WORKER_COMMON + textwrap.dedent("""
    from ct_jax.parallel import initialize_distributed
    initialize_distributed()  # from CT_COORDINATOR_ADDRESS / CT_NUM_PROCESSES / CT_PROCESS_ID
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    _, out, _ = run("jit")
    out["streams"] = run_streams("jit")
    print(json.dumps(out))
""")
@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Every worker of this module, started together (they compile in parallel with this process)."""
    logs = tmp_path_factory.mktemp("parallel_workers")
    flags = f"{FAST_XLA_FLAGS} --xla_force_host_platform_device_count="
    address = f"127.0.0.1:{_free_port()}"
    started = {}
    try:
        started["8 devices"] = _start(EIGHT_DEVICES, _env(XLA_FLAGS=flags + "8"), logs, "eight")
        for process_id in range(2):
            env = _env(XLA_FLAGS=flags + "2", CT_COORDINATOR_ADDRESS=address, CT_NUM_PROCESSES="2",
                       CT_PROCESS_ID=str(process_id))
            started[f"process {process_id} of 2"] = _start(TWO_PROCESSES, env, logs, f"process{process_id}")
        yield started
    finally:
        for proc, _, _ in started.values():  # never leave a worker behind (or waiting for its partner)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def one_device(workers) -> dict:
    """The same two steps in this process, on one device (tests/test_training.py's compiled step)."""
    trainer = make_trainer(CONFIG)
    state = trainer.place(trainer.init_state())
    losses = []
    for seed in SEEDS:
        state, metrics = trainer.train_step(state, batch(seed))
        losses.append(trainer.metrics(metrics))
    return {"losses": losses, "params": jax.tree.leaves(trainer.host(state).params)}


@pytest.fixture(scope="module")
def one_device_streams(workers) -> dict:
    """The worker's `run_streams` in this process, on one device."""
    config = dataclasses.replace(CONFIG, data_order="streams")
    trainer = make_trainer(config)
    state = trainer.place(trainer.init_state())
    split = np.random.default_rng(7).integers(0, 256, 3000).astype(np.uint8)
    sampler = streams.StreamSampler(split, np.arange(0, 3000, 13), MODEL["seq_len"], config.n_segments,
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
    out = _result(*workers["8 devices"], "8-device worker")
    compressed_counts = np.asarray(one_device_streams["memory"][3])
    assert compressed_counts.min() < compressed_counts.max(), f"rows should hold different memory: {compressed_counts}"
    _assert_same_streams("streams, pmap on 8 devices", out["streams pmap"], one_device_streams)
    _assert_same_streams("streams, jit + Mesh on 8 devices", out["streams jit"], one_device_streams)


def test_pmap_and_mesh_jit_on_8_devices_match_one_device(workers, one_device):
    out = _result(*workers["8 devices"], "8-device worker")
    assert one_device["losses"][0]["aux"] > 0, "the aux path must be exercised"
    _assert_same_run("pmap on 8 devices", out["pmap"], one_device)
    _assert_same_run("jit + Mesh on 8 devices", out["jit"], one_device)
    assert out["memory_sharded"], "the jit step does not constrain the memory carry (l, b, m, d) to split b on 'data'"


def test_fsdp_on_8_devices_matches_one_device_with_an_eighth_of_the_state_each(workers, one_device):
    out = _result(*workers["8 devices"], "8-device worker")
    _assert_same_run("fsdp on 8 devices", out["fsdp"], one_device)
    for name in ("fsdp_params", "fsdp_params_and_adam"):
        total, per_device, replicated = out[name]
        assert len(per_device) == 8, f"{name}: held by {len(per_device)} devices"
        # every parameter of the tiny model has an axis 8 divides: only scalars (Adam's count) stay whole
        assert max(per_device) <= total / 8 + 64, f"{name}: a device holds {max(per_device)} of {total} bytes"
        assert all("count" in path for path in replicated), f"{name}: replicated arrays {replicated}"


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(workers):
    """Two processes x 2 CPU devices, jax.distributed over 127.0.0.1, against one process's 4-device mesh."""
    expected = _result(*workers["8 devices"], "8-device worker")["jit on 4 devices"]
    for process_id in range(2):
        got = _result(*workers[f"process {process_id} of 2"], f"process {process_id} of 2")
        _assert_same_run(f"process {process_id} of 2 (2 devices each)", got, expected)
        _assert_same_streams(f"streams, process {process_id} of 2", got["streams"],
                             _result(*workers["8 devices"], "8-device worker")["streams jit on 4 devices"])


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
