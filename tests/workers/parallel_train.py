"""Worker of tests/test_parallel.py: two training steps of tests.configs' tiny model in a fresh
process, whose device count XLA_FLAGS fixes when JAX starts.

    python -m tests.workers.parallel_train eight_devices   # pmap, jit on 4 and on 8 devices
    python -m tests.workers.parallel_train two_processes   # jit over jax.distributed (CT_* variables)

Prints one JSON line: per run, the metrics of each step and the parameters after the last
(the second segment compresses, so the aux loss is exercised).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any

import jax
import numpy as np

from ct_jax.parallel import initialize_distributed
from tests.configs import TRAIN_CONFIG, make_trainer, train_batch

SEEDS = (100, 101)  # one batch per step
# Parameters after steps are compared, so the update must be linear in the gradient: under Adam a
# near-zero gradient coordinate flipping sign with the reduction order moves by 2 * lr (tests/tolerances.py).
CONFIG = dataclasses.replace(TRAIN_CONFIG, optimizer="sgd")


def run(mode: str, devices: list[jax.Device] | None = None):
    """(trainer, {losses, params}) after one step per seed in parallel mode `mode`."""
    config = dataclasses.replace(CONFIG, parallel=mode)
    trainer = make_trainer(config, devices=devices, compiler_options=None)  # pmap: options via XLA_FLAGS only
    state = trainer.place(trainer.init_state())
    local = config.batch_size // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    losses = []
    for seed in SEEDS:
        state, metrics = trainer.train_step(state, train_batch(seed, config)[rows])
        losses.append(trainer.metrics(metrics))
    params = [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(trainer.host(state).params)]
    return trainer, {"losses": losses, "params": params}


def eight_devices() -> dict[str, Any]:
    """pmap and jit on 8 devices, jit on 4 (the two-process test's reference), and whether the
    jit step constrains the memory carry (layers, b, slots, dim) to split b on the data axis."""
    assert jax.device_count() == 8, jax.devices()
    out: dict[str, Any] = {}
    _, out["pmap"] = run("pmap")
    _, out["jit on 4 devices"] = run("jit", jax.devices()[:4])
    trainer, out["jit"] = run("jit")
    tokens = np.zeros_like(train_batch(0))
    hlo = trainer._train.lower(trainer.place(trainer.init_state()), trainer.parallel.put_batch(tokens)).as_text()
    out["memory_sharded"] = bool(re.search(r'sharding_constraint .*\[\{\}, \{"data"\}, \{\}, \{\}\]', hlo)
                                 or "devices=[1,8,1,1]" in hlo)  # Shardy or GSPMD syntax
    return out


def two_processes() -> dict[str, Any]:
    """jit over 2 processes x 2 devices joined by jax.distributed."""
    initialize_distributed()  # from CT_COORDINATOR_ADDRESS / CT_NUM_PROCESSES / CT_PROCESS_ID
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    return run("jit")[1]


if __name__ == "__main__":
    programs = dict(eight_devices=eight_devices, two_processes=two_processes)
    if len(sys.argv) != 2 or sys.argv[1] not in programs:
        raise SystemExit(f"usage: python -m tests.workers.parallel_train {{{','.join(programs)}}}")
    print(json.dumps(programs[sys.argv[1]]()))
