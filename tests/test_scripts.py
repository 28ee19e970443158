"""scripts/generate.py, convert.py and parity.py refuse bad arguments with one line, before any work."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import ct_jax
from ct_jax import convert

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(num_tokens=256, dim=8, seq_len=4, depth=1, heads=2, mem_len=4, cmem_len=2, cmem_ratio=2)


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, errors="replace",
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A training --out folder: the export lies in its model/."""
    run = tmp_path_factory.mktemp("run")
    convert.save_pretrained(ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(0)), run / "model")
    return run


def _refused(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout[-500:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr and f"error: {message}" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("extra, message", [
    (("--temperature", "nan"), "--temperature must be a finite number >= 0, got nan"),
    (("--temperature", "inf"), "--temperature must be a finite number >= 0, got inf"),
    (("--temperature", "-1"), "--temperature must be a finite number >= 0, got -1.0"),
    (("--top-p", "nan"), "--top-p must be in (0, 1], got nan"),
    (("--seed", "-1"), "--seed must be an int >= 0, got -1"),
])
def test_generate_refuses_bad_sampling_options(run_folder, extra, message):
    _refused(_script("scripts/generate.py", "--checkpoint", str(run_folder), "--prime", "a", "--length", "2", *extra),
             message)


def test_generate_refuses_a_folder_as_prime_file_and_reads_a_training_folder(run_folder):
    _refused(_script("scripts/generate.py", "--checkpoint", str(run_folder), "--prime-file", str(run_folder),
                     "--length", "2"), f"--prime-file must be a file, got '{run_folder}' (a folder)")
    done = _script("scripts/generate.py", "--checkpoint", str(run_folder), "--prime", "ab", "--length", "3",
                   "--temperature", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 tokens in" in done.stderr


def test_generate_decodes_in_bfloat16(run_folder):
    done = _script("scripts/generate.py", "--checkpoint", str(run_folder), "--prime", "ab", "--length", "3",
                   "--temperature", "0", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 tokens in" in done.stderr
    _refused(_script("scripts/generate.py", "--checkpoint", str(run_folder), "--prime", "a", "--length", "2",
                     "--dtype", "int8"), "argument --dtype: invalid choice: 'int8'")


def test_convert_refuses_bad_configs_non_finite_weights_and_another_models_config(tmp_path, run_folder):
    _refused(_script("scripts/convert.py", "--from", str(run_folder / "model" / "model.safetensors"), "--config",
                     "[1,2]", "--to", str(tmp_path / "out")), "model arguments must be a mapping")
    (tmp_path / "bad.json").write_text(json.dumps(dict(CONFIG, colour=1)))
    _refused(_script("scripts/parity.py", "--config", str(tmp_path / "bad.json")), "unknown model arguments ['colour']")

    weights = convert.load_pretrained(run_folder)
    state = convert.to_numpy(weights)
    state["to_logits.1.bias"] = np.full_like(state["to_logits.1.bias"], np.inf)
    save_file(state, str(tmp_path / "model.safetensors"))
    done = _script("scripts/convert.py", "--from", str(tmp_path / "model.safetensors"), "--config", json.dumps(CONFIG),
                   "--to", str(tmp_path / "out"))
    _refused(done, "state_dict does not match the model: weights holding NaN or Inf ['to_logits.1.bias']")
    assert not (tmp_path / "out").exists()

    # Same shapes, another model: enhanced_recurrence is not in the weights, only in config.json.
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((run_folder / "model" / "model.safetensors").read_bytes())
    (other / "config.json").write_text(json.dumps(dict(CONFIG, enhanced_recurrence=False)))
    done = _script("scripts/convert.py", "--from", str(other / "model.safetensors"), "--config", json.dumps(CONFIG),
                   "--to", str(tmp_path / "out"))
    _refused(done, f"--config differs from {other / 'config.json'}")
    assert "'enhanced_recurrence': (True, False)" in done.stderr


@pytest.mark.parametrize("command, message", [
    (("scripts/bench.py", "--threads", "0"), "--threads must be >= 1, got 0"),
    (("scripts/parity.py", "--config", "{}", "--seed", "-1"), "--seed must be >= 0, got -1"),
])
def test_bench_and_parity_refuse_bad_counts(command, message):
    done = _script(*command)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


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
        assert f"from {module} import main" in (ROOT / "scripts" / f"{command}.py").read_text(), command
