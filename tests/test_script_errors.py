"""Every command speaks in one line: `ct_jax.cli.command` turns any error into `error: ...` and an exit status,
--debug shows the traceback, Ctrl-C exits 130, and a failing process exits whatever threads remain.

The one-line behaviour is checked in-process (`main(argv)` returns the status); one subprocess per script
proves the wiring of scripts/*.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flax import nnx

import ct_jax
from ct_jax import cli, convert
from ct_jax.commands import evaluate, generate, parity
from ct_jax.io import FolderLockedError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(num_tokens=256, dim=8, seq_len=4, depth=1, heads=2, mem_len=4, cmem_len=2, cmem_ratio=2)
SCRIPTS = ("train", "evaluate", "generate", "convert", "parity", "bench", "long_range")


def _one_line(capsys, status: int, expected_status: int, message: str) -> str:
    """The stderr of a refused command, checked: `expected_status`, one line `error: ...` holding `message`."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == expected_status, (status, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{err[-2000:]}"
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    convert.save_pretrained(ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(0)), folder)
    return folder


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    return path


def _copy(checkpoint: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("config.json", "model.safetensors"):
        (to / name).write_bytes((checkpoint / name).read_bytes())
    return to


# --- the wrapper ------------------------------------------------------------------------------------------


def _failing(error: BaseException):
    @cli.command
    def main(argv: list[str] | None = None) -> int:
        raise error

    return main


@pytest.mark.parametrize("error, status", [
    (ValueError("--batch-size must be a positive int, got 0"), 2),
    (TypeError("model arguments must be a mapping"), 2),
    (FileNotFoundError("--checkpoint x does not exist"), 2),
    (RuntimeError("cannot schedule new futures\nafter shutdown"), 1),
    (PermissionError(13, "Permission denied", "/root/x"), 1),
    (FolderLockedError("runs/x is in use by another run (holder: pid 1 on host h)"), 1),
])
def test_any_error_is_one_line_and_an_exit_status(capsys, error, status):
    line = _one_line(capsys, _failing(error)([]), status, " ".join(str(error).split()))
    foreign = isinstance(error, RuntimeError) and not isinstance(error, FolderLockedError)
    assert line.startswith(f"error: {type(error).__name__}: ") == foreign, "only a foreign error is named by type"
    assert ("--debug" in line) == foreign, line


def test_debug_prints_the_traceback(capsys):
    assert _failing(RuntimeError("boom"))(["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err


def test_ctrl_c_is_one_line_and_status_130(capsys):
    assert _failing(KeyboardInterrupt())([]) == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def test_usage_errors_are_one_line_and_help_still_exits_0(capsys, checkpoint):
    _one_line(capsys, generate.main(["--checkpoint", str(checkpoint), "--length", "2"]), 2,
              "one of the arguments --prime --prime-file is required")
    with pytest.raises(SystemExit) as exited:
        evaluate.main(["--help"])
    assert exited.value.code == 0 and "--debug" in capsys.readouterr().out


def test_a_failing_process_exits_though_a_non_daemon_thread_runs():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tests.workers.failing_command"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert done.stdout == "started\n", "stdout was not flushed before the exit"
    assert done.stderr.strip() == ("error: RuntimeError: cannot schedule new futures after shutdown "
                                   "(--debug prints the traceback)")
    assert time.monotonic() - started < 100


def test_ctrl_c_ends_a_process_with_one_line_and_130_though_a_thread_runs():
    worker = subprocess.Popen([sys.executable, "-m", "tests.workers.failing_command", "--wait"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert worker.stdout.readline() == "started\n"
        # what a hang would come from: SIGINT blocked or ignored in a thread of the worker (a mask it inherited)
        masks = {task.name: [line for line in (task / "status").read_text().splitlines() if line.startswith("Sig")]
                 for task in Path(f"/proc/{worker.pid}/task").iterdir()} if Path("/proc").is_dir() else {}
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGINT did not end the process; its threads' signal masks: {masks}") from None
    finally:
        worker.kill()
    assert worker.returncode == 130 and err == "interrupted (Ctrl-C)\n", (worker.returncode, err[-2000:])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_a_bad_flag_in_one_line(script):
    """The wiring: scripts/NAME.py runs `cli.command`, so an unknown flag is one line and status 2."""
    done = subprocess.run([sys.executable, f"scripts/{script}.py", "--no-such-flag"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert lines[0].endswith(f"(see {script}.py --help)"), lines[0]


# --- evaluate and parity: every refusal before any work -----------------------------------------------------


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fails the test if a split is evaluated: refusals come first."""

    def stream_eval(*args, **kwargs):
        raise AssertionError("evaluated before the refusal")

    monkeypatch.setattr(evaluate.evaluation, "stream_eval", stream_eval)


def test_evaluate_refuses_a_missing_checkpoint(capsys, tmp_path, corpus, no_evaluation):
    status = evaluate.main(["--checkpoint", str(tmp_path / "nowhere"), "--data", str(corpus)])
    _one_line(capsys, status, 2, f"--checkpoint {tmp_path / 'nowhere'} does not exist")
    (tmp_path / "empty").mkdir()
    status = evaluate.main(["--checkpoint", str(tmp_path / "empty"), "--data", str(corpus)])
    _one_line(capsys, status, 2, "holds no config.json, no model/ and no checkpoints/")


@pytest.mark.parametrize("flag", ["--batch-size", "--segments-per-call", "--max-segments", "--max-bytes"])
def test_evaluate_refuses_non_positive_counts(capsys, checkpoint, corpus, no_evaluation, flag):
    status = evaluate.main(["--checkpoint", str(checkpoint), "--data", str(corpus), flag, "0"])
    _one_line(capsys, status, 2, f"{flag} must be a positive int, got 0")


def test_evaluate_refuses_damaged_checkpoint_files(capsys, tmp_path, checkpoint, corpus, no_evaluation):
    truncated_config = _copy(checkpoint, tmp_path / "config")
    text = (truncated_config / "config.json").read_text()
    (truncated_config / "config.json").write_text(text[: len(text) // 2])
    status = evaluate.main(["--checkpoint", str(truncated_config), "--data", str(corpus)])
    _one_line(capsys, status, 2, "config.json is not valid JSON")

    truncated_weights = _copy(checkpoint, tmp_path / "weights")
    data = (truncated_weights / "model.safetensors").read_bytes()
    (truncated_weights / "model.safetensors").write_bytes(data[: len(data) // 2])
    status = evaluate.main(["--checkpoint", str(truncated_weights), "--data", str(corpus)])
    _one_line(capsys, status, 2, "model.safetensors is not a readable safetensors file")


def _wrong_shape(checkpoint: Path, to: Path) -> Path:
    """A copy of `checkpoint` whose config.json says dim 16: every weight has the wrong shape."""
    folder = _copy(checkpoint, to)
    (folder / "config.json").write_text(json.dumps(dict(CONFIG, dim=16)))
    return folder


def test_evaluate_and_parity_refuse_weights_of_the_wrong_shape(capsys, tmp_path, checkpoint, corpus, no_evaluation):
    wrong = _wrong_shape(checkpoint, tmp_path / "wrong")
    status = evaluate.main(["--checkpoint", str(wrong), "--data", str(corpus)])
    _one_line(capsys, status, 2, "state_dict does not match the model: shape/dtype mismatches")
    _one_line(capsys, parity.main(["--checkpoint", str(wrong)]), 2,
              "state_dict does not match the model: shape/dtype mismatches")


def test_evaluate_refuses_data_too_short_for_its_streams_before_evaluating_any_split(capsys, tmp_path, checkpoint,
                                                                                     no_evaluation):
    short = tmp_path / "short.txt"
    short.write_text("0123456789" * 30)  # 300 bytes: 5% test split = 15 bytes
    status = evaluate.main(["--checkpoint", str(checkpoint), "--data", str(short), "--batch-size", "16"])
    _one_line(capsys, status, 2, "is too short for --batch-size 16 streams of 2 bytes or more")


@pytest.fixture(scope="module")
def sinusoidal_checkpoint(tmp_path_factory) -> Path:
    """A model with no parameter that depends on the memory lengths (Transformer-XL positions)."""
    folder = tmp_path_factory.mktemp("sinusoidal") / "model"
    model = ct_jax.CompressiveTransformer(**CONFIG, relative_positions="sinusoidal", rngs=nnx.Rngs(0))
    convert.save_pretrained(model, folder)
    return folder


def test_evaluate_refuses_memory_lengths_its_parameters_do_not_allow(capsys, checkpoint, corpus, no_evaluation):
    status = evaluate.main(["--checkpoint", str(checkpoint), "--data", str(corpus), "--cmem-len", "8"])
    _one_line(capsys, status, 2, "--cmem-len 8: the model's parameters depend on the memory lengths (pos_emb "
              "(2, 10, 4) would need (2, 16, 4)")
    status = evaluate.main(["--checkpoint", str(checkpoint), "--data", str(corpus), "--mem-len", "-1"])
    _one_line(capsys, status, 2, "--mem-len must be an int >= 0, got -1")
    status = evaluate.main(["--checkpoint", str(checkpoint), "--data", str(corpus), "--mem-len", "2"])
    _one_line(capsys, status, 2, "--mem-len 2: mem_len must be at least seq_len (4), got 2")
    status = evaluate.main(["--checkpoint", str(checkpoint), "--data", str(corpus), "--knockout", "cmem"])
    assert status == 2 and "argument --knockout: invalid choice: 'cmem'" in capsys.readouterr().err


def test_evaluate_prints_buckets_and_masses_with_other_memory_lengths_and_knockouts(capsys, sinusoidal_checkpoint,
                                                                                     corpus):
    common = ["--checkpoint", str(sinusoidal_checkpoint), "--data", str(corpus), "--batch-size", "2", "--split",
              "validation", "--no-progress"]
    bits = {}
    for extra in ([], ["--cmem-len", "8"], ["--mem-len", "8", "--cmem-len", "0"], ["--knockout", "compressed"],
                  ["--knockout", "memory"]):
        assert evaluate.main(common + extra) == 0, extra
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 3 and out[0].startswith("validation: "), out
        bits[" ".join(extra)] = float(out[0].split()[1])
        assert out[1].startswith("  bits/token by distance from the document start (tokens): window [< 4] "), out[1]
        assert out[2].startswith("  attention mass compressed memory/memory/segment: layer 1 "), out[2]
    masses = [float(x) for x in out[2].split("layer 1 ")[1].split("/")]
    assert masses[:2] == [0.0, 0.0] and masses[2] == 1.0, f"--knockout memory leaves only the segment: {masses}"
    for setting in ("--cmem-len 8", "--knockout compressed", "--knockout memory"):
        assert bits[setting] != bits[""], f"{setting} must change what the model sees: {bits}"
