"""The commands behind scripts/*.py, in-process (`main(argv)` returns the exit status; the wiring of the
script files is tests/test_script_errors.py's): bad arguments refused in one line before any work,
run folders without an export, and conversions that never overwrite what a user made."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import ct_jax
import ct_torch_ref
from ct_jax import convert, train_loop, training
from ct_jax.commands import convert as convert_command
from ct_jax.commands import evaluate, generate, parity

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(num_tokens=256, dim=8, seq_len=4, depth=1, heads=2, mem_len=4, cmem_len=2, cmem_ratio=2)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A training --out folder: the export lies in its model/."""
    run = tmp_path_factory.mktemp("run")
    convert.save_pretrained(ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(0)), run / "model")
    return run


def _err(capture) -> str:
    """stderr captured by capsys, or by capsysbinary (generate writes raw bytes to stdout)."""
    err = capture.readouterr().err
    return err.decode(errors="replace") if isinstance(err, bytes) else err


def _refused(capsys, status: int, message: str) -> None:
    err = _err(capsys)
    assert status == 2, (status, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and f"error: {message}" in lines[0], err[-2000:]


@pytest.mark.parametrize("extra, message", [
    (("--temperature", "nan"), "--temperature must be a finite number >= 0, got nan"),
    (("--temperature", "inf"), "--temperature must be a finite number >= 0, got inf"),
    (("--temperature", "-1"), "--temperature must be a finite number >= 0, got -1.0"),
    (("--top-p", "nan"), "--top-p must be in (0, 1], got nan"),
    (("--seed", "-1"), "--seed must be an int >= 0, got -1"),
])
def test_generate_refuses_bad_sampling_options(capsys, run_folder, extra, message):
    _refused(capsys, generate.main(["--checkpoint", str(run_folder), "--prime", "a", "--length", "2", *extra]),
             message)


def test_generate_refuses_a_folder_as_prime_file_and_reads_a_training_folder(capsysbinary, run_folder):
    capsys = capsysbinary
    _refused(capsys, generate.main(["--checkpoint", str(run_folder), "--prime-file", str(run_folder),
                                    "--length", "2"]), f"--prime-file must be a file, got '{run_folder}' (a folder)")
    assert generate.main(["--checkpoint", str(run_folder), "--prime", "ab", "--length", "3", "--temperature",
                          "0"]) == 0
    assert "3 tokens in" in _err(capsys)


def test_generate_samples_several_primes_in_one_batch(capsysbinary, run_folder, tmp_path):
    """Several --prime, or a --prime-file line each: one batched call whose continuations are those of each
    prime alone, in order, one per line; an empty prime is refused in one line."""
    capsys = capsysbinary
    primes, base = ["ab", "hello world", "x"], ["--checkpoint", str(run_folder), "--length", "6", "--temperature", "0"]
    alone = []
    for prime in primes:
        assert generate.main([*base, "--prime", prime]) == 0
        alone.append(capsys.readouterr().out)
    assert generate.main([*base, *(arg for prime in primes for arg in ("--prime", prime))]) == 0
    batched = capsys.readouterr()
    assert batched.out == b"".join(alone), (batched.out, alone)
    assert b"3 samples of 6 tokens" in batched.err
    (tmp_path / "primes.txt").write_text("\n".join(primes) + "\n")
    assert generate.main([*base, "--prime-file", str(tmp_path / "primes.txt")]) == 0
    assert capsys.readouterr().out == b"".join(alone)
    (tmp_path / "gap.txt").write_text("ab\n\nx\n")
    _refused(capsys, generate.main([*base, "--prime-file", str(tmp_path / "gap.txt")]),
             f"--prime-file '{tmp_path / 'gap.txt'}': line 2 is empty; give one prime per line")
    _refused(capsys, generate.main([*base, "--prime", "ab", "--prime", ""]),
             "--prime number 2 is empty; give at least one byte")


def test_generate_decodes_in_bfloat16(capsysbinary, run_folder):
    capsys = capsysbinary
    assert generate.main(["--checkpoint", str(run_folder), "--prime", "ab", "--length", "3", "--temperature", "0",
                          "--dtype", "bfloat16"]) == 0
    assert "3 tokens in" in _err(capsys)
    _refused(capsys, generate.main(["--checkpoint", str(run_folder), "--prime", "a", "--length", "2", "--dtype",
                                    "int8"]), "argument --dtype: invalid choice: 'int8'")


def test_convert_refuses_bad_configs_non_finite_weights_and_another_models_config(capsys, tmp_path, run_folder):
    status = convert_command.main(["--from", str(run_folder / "model" / "model.safetensors"), "--config", "[1,2]",
                                   "--to", str(tmp_path / "out")])
    _refused(capsys, status, "model arguments must be a mapping")
    (tmp_path / "bad.json").write_text(json.dumps(dict(CONFIG, colour=1)))
    _refused(capsys, parity.main(["--config", str(tmp_path / "bad.json")]), "unknown model arguments ['colour']")

    weights = convert.load_pretrained(run_folder)
    state = convert.to_numpy(weights)
    state["to_logits.1.bias"] = np.full_like(state["to_logits.1.bias"], np.inf)
    save_file(state, str(tmp_path / "model.safetensors"))
    status = convert_command.main(["--from", str(tmp_path / "model.safetensors"), "--config", json.dumps(CONFIG),
                                   "--to", str(tmp_path / "out")])
    _refused(capsys, status, "state_dict does not match the model: weights holding NaN or Inf ['to_logits.1.bias']")
    assert not (tmp_path / "out").exists()

    # Same shapes, another model: enhanced_recurrence is not in the weights, only in config.json.
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((run_folder / "model" / "model.safetensors").read_bytes())
    (other / "config.json").write_text(json.dumps(dict(CONFIG, enhanced_recurrence=False)))
    status = convert_command.main(["--from", str(other / "model.safetensors"), "--config", json.dumps(CONFIG),
                                   "--to", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and f"error: --config differs from {other / 'config.json'}" in err, err
    assert "'enhanced_recurrence': (True, False)" in err


@pytest.mark.parametrize("command, argv, message", [
    ("bench", ["--threads", "0"], "--threads must be >= 1, got 0"),
    ("parity", ["--config", "{}", "--seed", "-1"], "--seed must be >= 0, got -1"),
])
def test_bench_and_parity_refuse_bad_counts(capsys, command, argv, message):
    main = importlib.import_module(f"ct_jax.commands.{command}").main
    _refused(capsys, main(argv), message)


def test_console_scripts_and_script_files_run_the_same_commands():
    """pyproject's `ct-NAME` and scripts/NAME.py (for an uninstalled clone) both call ct_jax.commands.NAME."""
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    files = sorted(path.stem for path in (ROOT / "scripts").glob("*.py") if not path.stem.startswith("_"))
    assert sorted(name.removeprefix("ct-").replace("-", "_") for name in entry_points) == files
    for name, target in entry_points.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
        command = name.removeprefix("ct-").replace("-", "_")
        assert module == f"ct_jax.commands.{command}", target
        text = (ROOT / "scripts" / f"{command}.py").read_text()
        assert re.search(rf"from {module} import [\w, ]*\b{function}\b", text), command
        assert re.search(rf"sys\.exit\({function}\(\)\)", text), f"scripts/{command}.py must exit with {function}()"


# --- convert never overwrites what a user made -------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _other_weights(tmp_path: Path) -> Path:
    """A state_dict file of another model of CONFIG's shapes, with its config.json beside it."""
    folder = tmp_path / "other_source"
    convert.save_pretrained(ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(7)), folder)
    return folder / "model.safetensors"


def test_convert_onto_an_existing_model_folder_needs_force_and_then_swaps_it_whole(capsys, tmp_path, run_folder):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    source = _other_weights(tmp_path)
    before = _snapshot(run)
    for target in (run / "model", run / "model" / "model.safetensors"):
        status = convert_command.main(["--from", str(source), "--to", str(target)])
        _refused(capsys, status, f"--to {target} already exists; --force replaces it")
        assert _snapshot(run) == before, "a refused conversion changed the run folder"
    # A folder holding more than a checkpoint (a run's own folder) is never replaced, --force or not.
    status = convert_command.main(["--from", str(source), "--to", str(run), "--force"])
    _refused(capsys, status, f"--to {run} holds more than a checkpoint (model)")
    assert _snapshot(run) == before

    assert convert_command.main(["--from", str(source), "--to", str(run / "model"), "--force"]) == 0
    assert _snapshot(run / "model") == _snapshot(source.parent), "--force did not replace the folder"
    assert sorted(path.name for path in run.iterdir()) == ["model"], "a temporary folder was left beside it"


def test_convert_names_the_dtypes_it_casts_and_keeps_them_with_keep_dtype(capsys, tmp_path):
    model = ct_torch_ref.CompressiveTransformer(**CONFIG)
    state = {key: value.to(torch.float16 if "weight" in key else torch.float64) for key, value in
             model.state_dict().items()}
    state["pos_emb"] = state["pos_emb"].to(torch.bfloat16)
    torch.save(state, tmp_path / "mixed.pt")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    counts = {name: sum(str(v.dtype) == f"torch.{name}" for v in state.values())
              for name in ("bfloat16", "float16", "float64")}
    listed = ", ".join(f"{counts[name]} {name}" for name in sorted(counts))

    assert convert_command.main(["--from", str(tmp_path / "mixed.pt"), "--to", str(tmp_path / "cast")]) == 0
    assert f"cast {listed} tensors to float32 (--keep-dtype keeps them)" in capsys.readouterr().out
    assert {str(v.dtype) for v in load_file(str(tmp_path / "cast" / "model.safetensors")).values()} == {"float32"}

    assert convert_command.main(["--from", str(tmp_path / "mixed.pt"), "--to", str(tmp_path / "kept.pt"),
                                 "--keep-dtype"]) == 0
    assert f"kept the source dtypes of {listed} tensors (--keep-dtype)" in capsys.readouterr().out
    kept = torch.load(tmp_path / "kept.pt", weights_only=True)
    for key, value in state.items():
        assert kept[key].dtype == value.dtype and torch.equal(kept[key], value), key


# --- an interrupted run is usable: its newest verified checkpoint ------------------------------------------


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> tuple[Path, training.TrainState]:
    """A 4-step run checkpointed at steps 2 and 4, its model/ removed (as a run stopped before its export);
    and the state it ended with."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    rng = np.random.default_rng(0)
    splits = {name: rng.integers(0, 256, size).astype(np.uint8)
              for name, size in (("train", 4000), ("validation", 400), ("test", 400))}
    config = training.TrainConfig(batch_size=2, n_segments=2, steps=4, checkpoint_every=2, eval_every=0,
                                  eval_batches=1)
    result = train_loop.fit(ct_jax.ModelConfig(**CONFIG), config, splits, out, progress=False, log=lambda _: None)
    shutil.rmtree(out / "model")
    return out, result.state


def test_generate_evaluate_parity_and_convert_take_a_run_folder_without_its_export(capsysbinary, tmp_path,
                                                                                   interrupted_run):
    run, state = interrupted_run
    loaded = f"loaded step 4 of {run / 'checkpoints'} (the run's newest verified checkpoint"
    assert generate.main(["--checkpoint", str(run), "--prime", "ab", "--length", "3", "--temperature", "0"]) == 0
    assert loaded in _err(capsysbinary)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    assert evaluate.main(["--checkpoint", str(run), "--data", str(corpus), "--batch-size", "2", "--max-segments",
                          "2", "--no-progress"]) == 0
    assert loaded in _err(capsysbinary)
    assert parity.main(["--checkpoint", str(run), "--segments", "2", "--batch", "1"]) == 0
    assert loaded in capsysbinary.readouterr().out.decode()

    assert convert_command.main(["--from", str(run), "--to", str(tmp_path / "export")]) == 0
    exported = convert.load_pretrained(tmp_path / "export")
    final = jax.tree.leaves(state.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(exported, nnx.Param)), final))


def test_a_damaged_newest_checkpoint_is_passed_over_and_nothing_is_moved(capsysbinary, tmp_path, interrupted_run):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run[0], run)
    newest = run / "checkpoints" / "4" / "state"
    largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:100])
    before = _snapshot(run)
    assert generate.main(["--checkpoint", str(run), "--prime", "ab", "--length", "2", "--temperature", "0"]) == 0
    assert f"loaded step 2 of {run / 'checkpoints'}" in _err(capsysbinary)
    assert _snapshot(run) == before, "a reader changed the run folder"
