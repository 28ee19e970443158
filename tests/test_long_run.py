"""A long run neither recompiles nor grows host memory (issue: robustness)."""

from __future__ import annotations

import jax

from tests.configs import make_trainer, train_batch

STEPS = 300


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_hundreds_of_steps_compile_once_and_keep_host_memory_flat():
    compiles = []

    def on_event(event: str, duration: float, **_) -> None:
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        trainer = make_trainer()
        state = trainer.place(trainer.init_state())
        batches = [train_batch(seed) for seed in range(8)]
        for step in range(STEPS):
            state, device_metrics = trainer.train_step(state, batches[step % len(batches)])
            if step == 49:
                trainer.metrics(device_metrics)
                compiles_after_warmup, rss_after_warmup = len(compiles), _rss_mib()
    finally:  # the listener is process-wide: leave no trace for later tests
        jax.monitoring.unregister_event_duration_listener(on_event)
    trainer.metrics(device_metrics)
    assert len(compiles) == compiles_after_warmup, (
        f"{len(compiles) - compiles_after_warmup} compilations after step 50: the step retraces"
    )
    growth = _rss_mib() - rss_after_warmup
    assert growth < 64, f"host memory grew by {growth:.0f} MiB over {STEPS - 50} steps"
