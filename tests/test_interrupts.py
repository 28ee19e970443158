"""The train command stopped by a signal or a failing checkpointer: real subprocesses, real signals.

SIGINT / SIGTERM: the step in flight finishes, a verified checkpoint is written, one line names
it, the status is 130 / 143, and the same command resumes from it; a second signal aborts at
once. A checkpointer that fails mid-run ends the process with a one-line error.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.once import computed_once, shared_folder

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240
# Far more steps than run before the signal; no periodic checkpoint or validation.
FLAGS = ["--dim", "16", "--depth", "1", "--heads", "2", "--seq-len", "8", "--mem-len", "8", "--cmem-len", "4",
         "--cmem-ratio", "2", "--batch-size", "4", "--n-segments", "2", "--eval-every", "0", "--eval-segments", "2",
         "--checkpoint-every", "0", "--sample-length", "0", "--fast-compile"]
ACKNOWLEDGED = "finishing the current step and writing a checkpoint"


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # the command sets what it needs
    return env


def _train(workdir: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, "--steps", str(steps), "--data",
            str(workdir / "corpus.txt"), "--out", str(out), "--compile-cache", str(workdir / "xla-cache")]


class _Run:
    """A training subprocess whose stderr (the progress bar) is read as it comes."""

    def __init__(self, command: list[str]):
        self.proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(1), ""):
            self.stderr += chunk

    def wait_for(self, pattern: str) -> bool:
        """Whether `pattern` appears in stderr before the process ends or the timeout."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if re.search(pattern, self.stderr):
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)
                return bool(re.search(pattern, self.stderr))
            time.sleep(0.05)
        return False

    def finish(self) -> tuple[int, str, str]:
        stdout, _ = self.proc.communicate(timeout=TIMEOUT)
        self._reader.join(10)
        return self.proc.returncode, stdout, self.stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _complete_steps(out: Path) -> list[int]:
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _corpus(folder: Path) -> str:
    rng = np.random.default_rng(0)
    words = "def return self import class for in if else while the value of None True".split()
    (folder / "corpus.txt").write_text(" ".join(words[i] for i in rng.integers(0, len(words), 3000)))
    return str(folder)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The corpus and compilation cache of this module's runs, one for the test run's workers."""
    return Path(computed_once(shared_folder(tmp_path_factory, "interrupts"), "workdir", _corpus))


def _stop(run: _Run, name: str, signum: int) -> None:
    """`signum` sent once `run` has stepped (twice for "twice", the second after the acknowledgement)."""
    assert run.wait_for(r"\b[1-9]\d*/100000"), f"{name}: no step reported:\n{run.stderr[-2000:]}"
    run.proc.send_signal(signum)
    if name == "twice":
        assert run.wait_for(ACKNOWLEDGED), run.stderr[-2000:]
        run.proc.send_signal(signum)


@pytest.fixture(scope="module")
def interrupted(workdir):
    """Three runs, once for the test run: stopped by SIGTERM, by SIGINT, and by SIGINT twice; name ->
    (status, stdout, stderr, out)."""
    found = computed_once(workdir.parent, "interrupted", functools.partial(_interrupted_runs, workdir))
    return {name: (status, stdout, stderr, Path(out)) for name, (status, stdout, stderr, out) in found.items()}


def _interrupted_runs(workdir: Path, folder: Path) -> dict[str, tuple[int, str, str, str]]:
    """The first run fills the compilation cache and the other two start from it; each is signalled once it
    steps (a run left stepping takes a core from the others)."""
    signals = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "twice": signal.SIGINT}
    runs = {}
    try:
        for names in (["sigterm"], ["sigint", "twice"]):
            runs.update({name: _Run(_train(workdir, folder / name, 100_000)) for name in names})
            for name in names:
                _stop(runs[name], name, signals[name])
        return {name: (*run.finish(), str(folder / name)) for name, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()


@pytest.mark.parametrize("name, signum", [("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)])
def test_a_signal_checkpoints_the_step_says_so_in_one_line_and_the_run_resumes(workdir, interrupted, name, signum):
    status, stdout, stderr, out = interrupted[name]
    assert status == 128 + signum, f"exit status {status}:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, stdout[-2000:]
    match = re.fullmatch(rf"interrupted \({signal.Signals(signum).name}\) at step (\d+): checkpoint (.+) written; "
                         r"rerun the same command to resume", lines[0])
    assert match, lines[0]
    step = int(match.group(1))
    assert Path(match.group(2)) == (out / "checkpoints" / str(step)).absolute()
    assert _complete_steps(out) == [step], "the checkpoint named must be the one written"
    assert not (out / "model").exists(), "an interrupted run exports nothing"
    if signum != signal.SIGTERM:  # one resume shows the checkpoint is a resumable one
        return
    resumed = subprocess.run(_train(workdir, out, step + 2), cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step} of {step + 2}" in resumed.stdout, resumed.stdout[-2000:]
    assert _complete_steps(out)[-1] == step + 2


def test_a_second_sigint_aborts_at_once_without_a_checkpoint(interrupted):
    status, stdout, stderr, out = interrupted["twice"]
    assert ACKNOWLEDGED in stderr and "send it again to abort now" in stderr
    # Either the second signal ended the process by its default action, or the first one's step had already
    # been checkpointed; never a traceback.
    assert status in (-signal.SIGINT, 130), f"exit status {status}:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    if status == -signal.SIGINT:
        assert "interrupted (SIGINT) at step" not in stdout


def test_a_failing_checkpointer_ends_the_run_with_one_line(workdir):
    out = workdir / "failing"
    command = [sys.executable, "-m", "tests.workers.failing_checkpointer", *FLAGS, "--steps", "6",
               "--checkpoint-every", "2", "--data", str(workdir / "corpus.txt"), "--out", str(out),
               "--compile-cache", str(workdir / "xla-cache"), "--no-progress"]
    try:
        done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the run hung after its checkpointer failed: {str(error.stderr)[-2000:]}")
    assert done.returncode == 1, f"exit status {done.returncode}:\n{done.stderr[-3000:]}"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match(rf"error: .*checkpoint.* could not be written to {out / 'checkpoints'} "
                                         r"\(RuntimeError: cannot schedule new futures", errors[0]), done.stderr[-3000:]
    assert "Traceback" not in done.stderr.split(errors[0])[1], done.stderr[-3000:]


def test_stop_signals_record_the_first_signal_then_restore_the_handlers():
    from ct_jax.interrupts import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.requested() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread
        assert stop.requested() == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "a second signal must end the process at once"
    assert signal.getsignal(signal.SIGTERM) is before


def test_every_process_stops_when_any_process_got_a_signal(monkeypatch):
    from jax.experimental import multihost_utils

    from ct_jax import interrupts

    gathered = []

    def allgather(value):  # this process got nothing, the other one SIGTERM
        gathered.append(int(value))
        return np.array([int(value), signal.SIGTERM])

    monkeypatch.setattr(interrupts.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    assert interrupts.StopSignals().requested() == signal.SIGTERM and gathered == [0]
