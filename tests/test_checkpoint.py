"""Checkpoints and the training loop's files: resume exactly, keep K, stop on NaN, export for torch."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import stat

import jax
import numpy as np
import pytest
import torch

import ct_torch_ref
from ct_jax import checkpointing, convert, event_log, train_loop, training
from ct_jax.checkpointing import Checkpoints, MetricsLog
from tests.configs import TRAIN_CONFIG, TRAIN_MODEL, train_batch
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
    kwargs = dict(dict(progress=False, log=lambda message: None, compiler_options=training.FAST_CPU_COMPILE), **kwargs)
    return train_loop.fit(TRAIN_MODEL, TRAIN_CONFIG, _splits(), out_dir, **kwargs)


def _rows(path) -> dict[int, dict[str, str]]:
    with open(path, newline="") as file:
        return {int(row["step"]): row for row in csv.DictReader(file)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run of TRAIN_CONFIG.steps steps (checkpoints every 2, the last 2 kept)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, _fit(out)


def test_run_writes_checkpoints_metrics_plot_and_export(finished):
    out, result = finished
    assert Checkpoints(out / "checkpoints").all_steps() == [4, 6], "keep_checkpoints=2 keeps the last two"
    rows = _rows(out / "metrics.csv")
    assert sorted(rows) == list(range(TRAIN_CONFIG.steps + 1))
    assert [step for step, row in rows.items() if row["val_bpb"]] == [0, 3, 6]
    assert float(rows[6]["val_bpb"]) < float(rows[0]["val_bpb"]), "validation bits/byte should fall"
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("metrics.csv", "loss.png", "model/model.safetensors", "model/config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, f"{name} ignores the umask"
    assert (out / "model" / convert.WEIGHTS_FILE).is_file() and (out / "model" / convert.CONFIG_FILE).is_file()
    assert int(result.state.step) == TRAIN_CONFIG.steps
    events = event_log.read_scalars(out)
    for tag in ("train/loss_per_token", "train/learning_rate", "train/grad_norm", "train/tokens_per_s",
                "validation/bits_per_byte"):
        assert tag in events, f"TensorBoard events lack {tag}: {sorted(events)}"
    assert [step for step, _ in events["train/loss_per_token"]] == list(range(1, TRAIN_CONFIG.steps + 1))
    assert [(step, round(value, 5)) for step, value in events["validation/bits_per_byte"]] == [
        (step, round(float(rows[step]["val_bpb"]), 5)) for step in (0, 3, 6)], "events and metrics.csv agree"


def test_checkpoint_holds_state_sampler_position_and_configs(finished):
    out, result = finished
    checkpoints = Checkpoints(out / "checkpoints")
    template = training.Trainer(result.model, TRAIN_CONFIG).init_state()
    state, record = checkpoints.restore(template)
    assert record["step"] == 6 and record["sampler"] == {"seed": TRAIN_CONFIG.seed, "step": 6}
    assert record["model_config"] == result.model.config.to_kwargs()
    assert record["train_config"] == TRAIN_CONFIG.to_json()
    for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(result.state)):
        np.testing.assert_array_equal(got, expected, err_msg="checkpoint differs from the final state")


def test_resume_continues_the_uninterrupted_run_exactly(finished, tmp_path):
    out, result = finished
    # A run that stopped after step 2 (its last checkpoint), then the same command again.
    resumed_dir = tmp_path / "resumed"
    train_loop.fit(TRAIN_MODEL, training.TrainConfig(**{**TRAIN_CONFIG.to_json(), "steps": 2}), _splits(), resumed_dir,
                 progress=False, log=lambda m: None, compiler_options=training.FAST_CPU_COMPILE)
    assert Checkpoints(resumed_dir / "checkpoints").all_steps() == [2]

    messages = []
    resumed = train_loop.fit(TRAIN_MODEL, TRAIN_CONFIG, _splits(), resumed_dir, progress=False, log=messages.append,
                           compiler_options=training.FAST_CPU_COMPILE)
    assert any("resumed from step 2" in m for m in messages), messages
    expected, got = _rows(out / "metrics.csv"), _rows(resumed_dir / "metrics.csv")
    assert sorted(got) == sorted(expected)
    for step in range(3, TRAIN_CONFIG.steps + 1):
        for name in COMPARED:
            if expected[step][name]:
                assert_close(f"{name} at step {step} after resuming from step 2", float(got[step][name]),
                             float(expected[step][name]), atol=1e-6)
    for got_leaf, expected_leaf in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(result.state)):
        assert_close("final state after resume", got_leaf, expected_leaf, atol=1e-6)


def test_streamed_run_resumes_exactly_with_stream_positions_and_memory(tmp_path):
    config = training.TrainConfig(**{**TRAIN_CONFIG.to_json(), "data_order": "streams", "eval_segments": 4})
    splits = _splits()
    documents = {"train": np.arange(0, len(splits["train"]), 700), "validation": np.array([0, 300])}

    def run(out, config):
        return train_loop.fit(TRAIN_MODEL, config, splits, out, progress=False, log=print,
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
    diagnostics = ["val_cmem_knockout_bpb", "val_mass_cmem_1", "val_mass_mem_1", "val_mass_segment_1"]
    for step in (3, 6):  # the memory diagnostics at validation, reproduced by the resumed run
        masses = [float(expected[step][name]) for name in diagnostics[1:]]
        assert abs(sum(masses) - 1) <= 1e-5 and min(masses) > 0, f"attention mass at step {step}: {masses}"
        assert float(expected[step]["val_cmem_knockout_bpb"]) != 0.0, "emptying the compressed memory costs bits"
        for name in diagnostics:
            assert float(got[step][name]) == float(expected[step][name]), f"{name} at step {step} after resume"
    events = event_log.read_scalars(tmp_path / "resumed")
    assert "memory/mass_cmem/layer1" in events and "memory/compressed_knockout_bits_per_byte" in events, sorted(events)


def test_resume_refuses_another_model(finished):
    out, _ = finished
    other = dict(TRAIN_MODEL, dim=8)
    with pytest.raises(ValueError, match="is of another model") as refused:
        train_loop.fit(other, TRAIN_CONFIG, _splits(), out, progress=False, log=lambda m: None)
    message = str(refused.value)
    assert "dim 16 -> 8" in message and "rerun with the checkpoint's values (--dim 16" in message, message
    assert "another --out" in message and "healthy and left as they are" in message, message
    assert "depth" not in message, "only the changed settings are named, not both whole configs"


def test_resuming_with_another_data_order_names_it_and_keeps_the_checkpoints(finished):
    out, _ = finished
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    streams = training.TrainConfig(**{**TRAIN_CONFIG.to_json(), "data_order": "streams"})
    with pytest.raises(ValueError) as refused:
        train_loop.fit(TRAIN_MODEL, streams, _splits(), out, progress=False, log=lambda m: None,
                       compiler_options=training.FAST_CPU_COMPILE)
    message = str(refused.value)
    assert "data_order windows -> streams" in message and "(--data-order windows)" in message, message
    assert "tree structure" not in message and "Move" not in message and "healthy" in message, message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_changed_settings_are_said_once_even_when_a_damaged_step_is_skipped(finished, tmp_path):
    run, _ = _copy_run(finished, tmp_path)
    newest = run / "checkpoints" / str(TRAIN_CONFIG.steps) / "state"
    largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:100])
    messages = []
    config = training.TrainConfig(**{**TRAIN_CONFIG.to_json(), "learning_rate": 5e-3})
    train_loop.fit(TRAIN_MODEL, config, _splits(), run, progress=False, log=messages.append,
                   compiler_options=training.FAST_CPU_COMPILE)
    said = [m for m in messages if "changed training settings" in m]
    assert said == ["resuming with changed training settings: learning_rate 0.01 -> 0.005"], messages


def test_byte_data_beyond_num_tokens_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"num_tokens=100 \(--num-tokens\) is too small for the data: the train "
                       r"split holds token ids up to 1\d\d; the model reads ids in \[0, 100\) \(byte data"):
        train_loop.fit(dict(TRAIN_MODEL, num_tokens=100), TRAIN_CONFIG, _splits(), tmp_path / "out", progress=False,
                       log=lambda m: None)
    assert not (tmp_path / "out").exists(), "nothing may be written"


@pytest.mark.parametrize("factor, trips", [(4.5, True), (3.5, False)])
def test_the_divergence_guard_compares_per_token_losses_at_the_stated_factor(tmp_path, monkeypatch, factor, trips):
    real_evaluate = train_loop._Run.evaluate

    def evaluate(self, *args, **kwargs):  # validation at `factor` x the running median train loss per token
        value = real_evaluate(self, *args, **kwargs)
        lm = self.history.column("lm")[1]
        return factor * float(np.median(lm[-16:])) / training.LN2 if lm else value

    monkeypatch.setattr(train_loop._Run, "evaluate", evaluate)
    if trips:
        with pytest.raises(training.TrainingDivergedError, match=r"\(validation after step \d\) is 4.\d+x the running"):
            _fit(tmp_path)
    else:
        _fit(tmp_path)
    rows = _rows(tmp_path / "metrics.csv") if not trips else {}
    for row in rows.values():
        if row["loss"]:
            assert float(row["loss"]) == pytest.approx(float(row["lm"]) + float(row["aux"]), rel=1e-5), row


def test_an_existing_run_is_not_overwritten_without_resume(finished):
    out, _ = finished
    with pytest.raises(ValueError, match=r"already holds checkpoints \(up to step 6\)"):
        _fit(out, resume=False)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_metrics = training.Trainer.metrics
    seen = []

    def metrics_with_nan_at_step_5(self, device_metrics):
        values = real_metrics(self, device_metrics)
        seen.append(values)
        if len(seen) == 5:
            values["loss"] = math.nan
        return values

    monkeypatch.setattr(training.Trainer, "metrics", metrics_with_nan_at_step_5)
    # Step 5's loss is computed with step 4's parameters: checkpoint 4 waits for it, and is dropped.
    with pytest.raises(training.NonFiniteLossError, match=r"non-finite loss at step 5 \(loss=nan, grad_norm=[0-9.]+\); "
                       r"the run stopped; checkpoint step 4 was not written; the newest checkpoint, step 2, is safe"):
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
    tokens = train_batch(9)
    trainer = training.Trainer(result.model, TRAIN_CONFIG, compiler_options=training.FAST_CPU_COMPILE)
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
    with pytest.raises(ValueError, match="unknown metrics"):
        reloaded.add(4, val_mass_cmem_0=1.0)  # layers count from 1

    def crash(tmp):
        with open(tmp, "w") as file:
            file.write("half a file")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        checkpointing.atomic_write(tmp_path / "metrics.csv", crash)
    assert _rows(tmp_path / "metrics.csv")[3]["loss"], "a crashed write must leave the previous file intact"
    reloaded.add(2, val_mass_segment_10=0.5, val_mass_cmem_2=0.25, val_mass_mem_2=0.75, val_cmem_knockout_bpb=0.01)
    reloaded.write()
    again = MetricsLog(tmp_path / "metrics.csv")
    layered = ("val_mass_cmem_2", "val_mass_mem_2", "val_mass_segment_10")  # by layer, then part
    assert again.columns() == MetricsLog.FIELDS + layered, again.columns()
    assert again.column("val_mass_segment_10") == ([2], [0.5])
    assert again.column("val_cmem_knockout_bpb") == ([2], [0.01])
    again.plot(tmp_path / "loss.png")  # with the memory panel
    assert not list(tmp_path.glob("*.tmp"))


def _copy_run(finished, tmp_path):
    out, result = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy, result


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty folder", "no record", "empty record", "no state"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_set_aside(finished, tmp_path, damage):
    run, result = _copy_run(finished, tmp_path)
    step_dir = run / "checkpoints" / "6"
    if damage == "truncate":
        with open(_largest_file(step_dir / "state"), "r+b") as file:
            file.truncate(100)
    elif damage == "flip":
        data_file = _largest_file(step_dir / "state")
        raw = bytearray(data_file.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        data_file.write_bytes(bytes(raw))
    elif damage == "empty folder":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    elif damage == "no record":
        shutil.rmtree(step_dir / "record")
    elif damage == "empty record":
        (step_dir / "record" / "metadata").write_text("")
    else:
        shutil.rmtree(step_dir / "state")
    messages = []
    resumed = _fit(run, log=messages.append)
    warning = next(m for m in messages if m.startswith("warning: skipping a damaged checkpoint"))
    assert "step 6" in warning, warning
    assert any("resumed from step 4" in m for m in messages), messages
    assert any(m.startswith("moved checkpoint step 6 to ") and "checkpoints-set-aside/6-damaged" in m for m in messages)
    assert (run / "checkpoints-set-aside" / "6-damaged").is_dir(), "nothing is deleted"
    for got, expected in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(result.state)):
        np.testing.assert_array_equal(got, expected, err_msg="the rerun from step 4 must redo step 6 exactly")


def test_flipped_bytes_that_the_storage_misses_are_caught_by_the_checksums(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2, async_save=False)
    state = {"w": np.arange(100_000, dtype=np.float32)}  # stored raw: a flip is not noticed by decompression
    checkpoints.save(1, state, {"step": 1})
    data_file = _largest_file(tmp_path / "1" / "state")
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(checkpointing.DamagedCheckpointError, match=r"step 1 fails its checksums: 1 of 1 arrays"):
        checkpoints.restore(state, 1)
    checkpoints.close()


def test_restore_verifies_the_checksums_saved_with_the_arrays(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2, async_save=False)
    state = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.float32)}
    checkpoints.save(1, state, {"step": 1})
    restored, record = checkpoints.restore(state, 1)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert set(record["checksums"]) == {"['b']", "['w']"}
    # Bytes that change on disk without the storage noticing: simulated by a record that disagrees.
    metadata = tmp_path / "1" / "record" / "metadata"
    saved = json.loads(metadata.read_text())
    saved["checksums"]["['w']"] = saved["checksums"]["['w']"][:-8] + "00000000"
    metadata.write_text(json.dumps(saved))
    message = r"step 1 fails its checksums: 1 of 2 arrays differ .*\['w'\]"
    with pytest.raises(checkpointing.DamagedCheckpointError, match=message):
        checkpoints.restore(state, 1)
    checkpoints.close()


def test_no_restorable_checkpoint_is_one_clear_error(finished, tmp_path):
    run, _ = _copy_run(finished, tmp_path)
    for step in (4, 6):
        shutil.rmtree(run / "checkpoints" / str(step) / "record")
    with pytest.raises(checkpointing.DamagedCheckpointError,
                       match=r"no checkpoint in .* can be restored: step 6 cannot be read .*; step 4 cannot be read"):
        _fit(run)


def test_resume_from_an_older_step_sets_the_newer_ones_aside(finished, tmp_path):
    run, result = _copy_run(finished, tmp_path)
    messages = []
    resumed = _fit(run, resume_from=4, log=messages.append)
    assert any("resumed from step 4" in m for m in messages), messages
    assert (run / "checkpoints-set-aside" / "6-after-resume-from-4").is_dir()
    for got, expected in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(result.state)):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match=r"resume_from=5: no checkpoint of that step .*steps there: \[4, 6\]"):
        _fit(run, resume_from=5)


def test_junk_in_metrics_csv_does_not_block_a_resume(finished, tmp_path):
    run, _ = _copy_run(finished, tmp_path)
    with open(run / "metrics.csv", "a") as file:
        file.write("7,not-a-number,,\n\x00garbage\n12")
    messages = []
    longer = training.TrainConfig(**{**TRAIN_CONFIG.to_json(), "steps": TRAIN_CONFIG.steps + 1})
    train_loop.fit(TRAIN_MODEL, longer, _splits(), run, progress=False, log=messages.append,
                   compiler_options=training.FAST_CPU_COMPILE)
    assert any("metrics.csv has unreadable lines" in m for m in messages), messages
    assert sorted(_rows(run / "metrics.csv")) == list(range(longer.steps + 1))


def test_resuming_on_other_data_warns(finished, tmp_path):
    run, _ = _copy_run(finished, tmp_path)
    splits = _splits()
    splits["train"] = splits["train"][::-1].copy()
    messages = []
    longer = training.TrainConfig(**{**TRAIN_CONFIG.to_json(), "steps": TRAIN_CONFIG.steps + 1})
    train_loop.fit(TRAIN_MODEL, longer, splits, run, progress=False, log=messages.append,
                   compiler_options=training.FAST_CPU_COMPILE)
    assert any("warning: the data changed since step 6 was checkpointed" in m and "--max-bytes" in m
               for m in messages), messages


def test_divergence_leaves_only_sane_checkpoints_and_names_the_safe_one(tmp_path):
    config = training.TrainConfig(
        **{**TRAIN_CONFIG.to_json(), "learning_rate": 1e6, "checkpoint_every": 1, "eval_every": 0})
    with pytest.raises(training.TrainingDivergedError, match="the run stopped; checkpoint step .* was not written; "):
        train_loop.fit(TRAIN_MODEL, config, _splits(), tmp_path, progress=False, log=lambda m: None,
                       compiler_options=training.FAST_CPU_COMPILE)
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    template = training.Trainer(training.create_model(TRAIN_MODEL, config), config).init_state()
    for step in checkpoints.all_steps():
        state, _ = checkpoints.restore(template, step)
        largest = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(state.params))
        assert largest < 50, f"checkpoint {step} holds exploded parameters (max |w| {largest})"


def test_a_finite_loss_spike_stops_the_run(tmp_path, monkeypatch):
    real_metrics = training.Trainer.metrics
    seen = []

    def metrics_with_spike_at_step_3(self, device_metrics):
        values = real_metrics(self, device_metrics)
        seen.append(values)
        if len(seen) == 3:
            values["loss"] *= 100
        return values

    monkeypatch.setattr(training.Trainer, "metrics", metrics_with_spike_at_step_3)
    with pytest.raises(training.TrainingDivergedError, match=r"loss .* at step 3 is .*x the running median .* "
                       r"checkpoint step 2 was not written; no checkpoint was written"):
        _fit(tmp_path)
    assert Checkpoints(tmp_path / "checkpoints").all_steps() == []


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    from ct_jax import io

    with io.folder_lock(tmp_path):
        with pytest.raises(io.FolderLockedError, match=f"holder: pid {os.getpid()} "):
            _fit(tmp_path)
    assert not (tmp_path / "checkpoints").exists(), "the refused run wrote nothing"


@pytest.fixture(scope="module")
def transformer_xl_streams(tmp_path_factory):
    """A streamed run of a plain Transformer-XL (cmem_len 0: zero-size compressed memory) stopped at step 2:
    (out, config, splits, documents)."""
    out = tmp_path_factory.mktemp("transformer_xl")
    config = training.TrainConfig(**{**TRAIN_CONFIG.to_json(), "data_order": "streams", "eval_segments": 2})
    splits = _splits()
    documents = {"train": np.arange(0, len(splits["train"]), 700), "validation": np.array([0, 300])}
    _fit_xl(out, training.TrainConfig(**{**config.to_json(), "steps": 2}), splits, documents, tensorboard=False,
            diagnostics=False)
    assert not list(out.glob("events.out.tfevents.*")), "tensorboard=False writes no events"
    assert "val_mass_cmem_1" not in _rows(out / "metrics.csv")[0], "diagnostics=False adds no columns"
    return out, config, splits, documents


def _fit_xl(out, config, splits, documents, **kwargs):
    kwargs = dict(dict(progress=False, log=lambda m: None, compiler_options=training.FAST_CPU_COMPILE), **kwargs)
    model = dict(TRAIN_MODEL, cmem_len=0)  # mem_len // cmem_ratio = 2: evicted slots are dropped, not compressed
    return train_loop.fit(model, config, splits, out, documents=documents, **kwargs)


def test_a_transformer_xl_checkpoints_its_empty_compressed_memory_and_resumes(transformer_xl_streams):
    out, config, splits, documents = transformer_xl_streams
    assert Checkpoints(out / "checkpoints").all_steps() == [2]
    messages = []
    result = _fit_xl(out, config, splits, documents, log=messages.append)
    assert any("resumed from step 2 of 6" in m for m in messages), messages
    assert result.state.memory.compressed_mem.shape[2] == 0 and int(result.state.step) == config.steps
    state, _ = Checkpoints(out / "checkpoints").restore(result.state)
    for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(result.state)):
        np.testing.assert_array_equal(got, expected, err_msg="restored Transformer-XL state")


def test_streams_on_changed_data_are_refused_naming_the_change(transformer_xl_streams):
    out, config, splits, documents = transformer_xl_streams
    smaller = {"train": splits["train"][:9000], "validation": splits["validation"]}
    with pytest.raises(ValueError, match=r"the data changed since step \d was checkpointed .*split bytes train "
                       r"15000 -> 9000.*the same --data and --max-bytes as the run that wrote it") as refused:
        _fit_xl(out, config, smaller, {"train": np.array([0]), "validation": documents["validation"]})
    assert "state['positions']" not in str(refused.value)


def test_fewer_steps_than_the_run_has_is_said_in_one_line_and_writes_nothing(transformer_xl_streams):
    out, config, splits, documents = transformer_xl_streams
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lock"}
    messages = []
    result = _fit_xl(out, training.TrainConfig(**{**config.to_json(), "steps": 1}), splits, documents,
                     log=messages.append)
    step = max(Checkpoints(out / "checkpoints").all_steps())
    assert result.start == step
    assert messages[-1] == f"run is at step {step} >= --steps 1: nothing to train; pass a larger --steps", messages
    assert not any("resumed from" in m for m in messages), messages
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lock"} == files, "nothing is written"
