"""Checkpoints and the training loop's files: resume exactly, keep K, stop on NaN, export for torch."""

from __future__ import annotations

import csv
import math

import jax
import numpy as np
import pytest
import torch

import ct_torch_ref
from ct_jax import checkpointing, convert, train_loop, training
from ct_jax.checkpointing import Checkpoints, MetricsLog
from tests.test_training import CONFIG, MODEL, batch
from tests.tolerances import JAX_VS_TORCH_ATOL, assert_close

COMPARED = ("loss", "lm", "aux", "bpb", "grad_norm", "learning_rate", "val_bpb")


def _splits() -> dict[str, np.ndarray]:
    """A small deterministic byte corpus with structure to learn (repeated words)."""
    rng = np.random.default_rng(0)
    words = [w.encode() for w in "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 3000))
    data = np.frombuffer(text, np.uint8)
    return {"train": data[:15000], "validation": data[15000:]}


def _fit(out_dir, **kwargs):
    return train_loop.fit(MODEL, CONFIG, _splits(), out_dir, progress=False, log=lambda message: None,
                        compiler_options=training.FAST_CPU_COMPILE, **kwargs)


def _rows(path) -> dict[int, dict[str, str]]:
    with open(path, newline="") as file:
        return {int(row["step"]): row for row in csv.DictReader(file)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run of CONFIG.steps steps (checkpoints every 2, the last 2 kept)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, _fit(out)


def test_run_writes_checkpoints_metrics_plot_and_export(finished):
    out, result = finished
    assert Checkpoints(out / "checkpoints").all_steps() == [4, 6], "keep_checkpoints=2 keeps the last two"
    rows = _rows(out / "metrics.csv")
    assert sorted(rows) == list(range(CONFIG.steps + 1))
    assert [step for step, row in rows.items() if row["val_bpb"]] == [0, 3, 6]
    assert float(rows[6]["val_bpb"]) < float(rows[0]["val_bpb"]), "validation bits/byte should fall"
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    assert (out / "model" / convert.WEIGHTS_FILE).is_file() and (out / "model" / convert.CONFIG_FILE).is_file()
    assert int(result.state.step) == CONFIG.steps


def test_checkpoint_holds_state_sampler_position_and_configs(finished):
    out, result = finished
    checkpoints = Checkpoints(out / "checkpoints")
    template = training.Trainer(result.model, CONFIG).init_state()
    state, record = checkpoints.restore(template)
    assert record["step"] == 6 and record["sampler"] == {"seed": CONFIG.seed, "step": 6}
    assert record["model_config"] == result.model.config.to_kwargs()
    assert record["train_config"] == CONFIG.to_json()
    for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(result.state)):
        np.testing.assert_array_equal(got, expected, err_msg="checkpoint differs from the final state")


def test_resume_continues_the_uninterrupted_run_exactly(finished, tmp_path):
    out, result = finished
    # A run that stopped after step 2 (its last checkpoint), then the same command again.
    resumed_dir = tmp_path / "resumed"
    train_loop.fit(MODEL, training.TrainConfig(**{**CONFIG.to_json(), "steps": 2}), _splits(), resumed_dir,
                 progress=False, log=lambda m: None, compiler_options=training.FAST_CPU_COMPILE)
    assert Checkpoints(resumed_dir / "checkpoints").all_steps() == [2]

    messages = []
    resumed = train_loop.fit(MODEL, CONFIG, _splits(), resumed_dir, progress=False, log=messages.append,
                           compiler_options=training.FAST_CPU_COMPILE)
    assert any("resumed from step 2" in m for m in messages), messages
    expected, got = _rows(out / "metrics.csv"), _rows(resumed_dir / "metrics.csv")
    assert sorted(got) == sorted(expected)
    for step in range(3, CONFIG.steps + 1):
        for name in COMPARED:
            if expected[step][name]:
                assert_close(f"{name} at step {step} after resuming from step 2", float(got[step][name]),
                             float(expected[step][name]), atol=1e-6)
    for got_leaf, expected_leaf in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(result.state)):
        assert_close("final state after resume", got_leaf, expected_leaf, atol=1e-6)


def test_streamed_run_resumes_exactly_with_stream_positions_and_memory(tmp_path):
    config = training.TrainConfig(**{**CONFIG.to_json(), "data_order": "streams", "eval_segments": 4})
    splits = _splits()
    documents = {"train": np.arange(0, len(splits["train"]), 700), "validation": np.array([0, 300])}
    run = lambda out, config: train_loop.fit(MODEL, config, splits, out, progress=False, log=lambda m: None,  # noqa: E731
                                             compiler_options=training.FAST_CPU_COMPILE, documents=documents)
    uninterrupted = run(tmp_path / "uninterrupted", config)
    run(tmp_path / "resumed", training.TrainConfig(**{**config.to_json(), "steps": 2}))
    _, record = Checkpoints(tmp_path / "resumed" / "checkpoints").restore(uninterrupted.state, 2)
    assert len(record["sampler"]["positions"]) == config.batch_size, record["sampler"]
    resumed = run(tmp_path / "resumed", config)
    expected, got = _rows(tmp_path / "uninterrupted" / "metrics.csv"), _rows(tmp_path / "resumed" / "metrics.csv")
    for step in range(3, config.steps + 1):
        for name in COMPARED:
            if expected[step][name]:
                assert float(got[step][name]) == float(expected[step][name]), f"{name} at step {step} after resume"
    assert resumed.state.memory is not None, "the carried memory is part of the state"
    for got_leaf, expected_leaf in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(uninterrupted.state)):
        np.testing.assert_array_equal(got_leaf, expected_leaf, err_msg="final state (memory included) after resume")


def test_resume_refuses_another_model(finished):
    out, _ = finished
    other = dict(MODEL, dim=8)
    with pytest.raises(ValueError, match="is of another model"):
        train_loop.fit(other, CONFIG, _splits(), out, progress=False, log=lambda m: None)


def test_an_existing_run_is_not_overwritten_without_resume(finished):
    out, _ = finished
    with pytest.raises(ValueError, match=r"already holds checkpoints \(up to step 6\)"):
        _fit(out, resume=False)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_metrics = training.Trainer.metrics
    seen = []

    def metrics_with_nan_at_step_3(self, device_metrics):
        values = real_metrics(self, device_metrics)
        seen.append(values)
        if len(seen) == 3:
            values["loss"] = math.nan
        return values

    monkeypatch.setattr(training.Trainer, "metrics", metrics_with_nan_at_step_3)
    with pytest.raises(training.NonFiniteLossError, match="non-finite loss at step 3 .*the last checkpoint is step 2"):
        _fit(tmp_path)
    assert Checkpoints(tmp_path / "checkpoints").all_steps() == [2], "no checkpoint may be written after a NaN"


def test_checkpoints_refuse_non_finite_state(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=1)
    with pytest.raises(FloatingPointError, match="refusing to checkpoint step 5"):
        checkpoints.save(5, {"w": np.array([1.0, np.nan], np.float32)}, {})
    checkpoints.close()
    assert Checkpoints(tmp_path).latest_step() is None


def test_export_loads_in_the_torch_reference_with_the_same_losses(finished):
    out, result = finished
    torch_model = ct_torch_ref.load_pretrained(out / "model")
    expected = convert.to_numpy(result.model)
    for key, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=f"exported {key} differs")
    # The same validation batch through both: torch's mean segment loss in bits = JAX's eval.
    tokens = batch(9)
    trainer = training.Trainer(result.model, CONFIG, compiler_options=training.FAST_CPU_COMPILE)
    jax_bpb = trainer.evaluate(trainer.place(result.state), iter([tokens]))
    wrapper = ct_torch_ref.AutoregressiveWrapper(torch_model.eval())
    with torch.no_grad():
        losses = [r.loss.item() for r in wrapper(torch.from_numpy(tokens).long(), return_loss=True)]
    assert_close("validation bits/byte, torch vs JAX", jax_bpb, np.mean(losses) / math.log(2), JAX_VS_TORCH_ATOL)


def test_metrics_log_round_trip_truncate_and_atomic_write(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    log.add(0, val_bpb=8.0)
    for step in (1, 2, 3):
        log.add(step, loss=1.0 / step, bpb=2.0)
    log.write()
    reloaded = MetricsLog(tmp_path / "metrics.csv")
    assert reloaded.column("loss") == ([1, 2, 3], [1.0, 0.5, 1.0 / 3])
    assert reloaded.column("val_bpb") == ([0], [8.0])
    reloaded.truncate(2)
    assert sorted(reloaded.rows) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown metrics"):
        reloaded.add(4, accuracy=1.0)

    def crash(tmp):
        with open(tmp, "w") as file:
            file.write("half a file")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        checkpointing.atomic_write(tmp_path / "metrics.csv", crash)
    assert _rows(tmp_path / "metrics.csv")[3]["loss"], "a crashed write must leave the previous file intact"
    assert not list(tmp_path.glob("*.tmp"))
