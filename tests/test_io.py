"""ct_jax.io (atomic writes, the output-folder lock) and ct_jax._checks (argument checks)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ct_jax import io
from ct_jax._checks import check_bool, check_float, check_int

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: check_int("n", 0), ValueError, "n must be a positive int, got 0"),
        (lambda: check_int("n", True), TypeError, "n must be a positive int, got True"),
        (lambda: check_int("n", 2.0), TypeError, "n must be a positive int, got 2.0"),
        (lambda: check_int("n", -1, 0), ValueError, "n must be an int >= 0, got -1"),
        (lambda: check_int("n", 3, 0, below=3), ValueError, r"n must be an int in \[0, 3\), got 3"),
        (lambda: check_float("x", float("nan")), ValueError, "x must be a finite number, got nan"),
        (lambda: check_float("x", -1.0, 0.0), ValueError, "x must be a finite number >= 0, got -1.0"),
        (lambda: check_float("x", 1.0, 0.0, below=1.0), ValueError,
         r"x must be a finite number in \[0, 1\), got 1.0"),
        (lambda: check_float("x", 1.5, 0.0, maximum=1.0), ValueError,
         r"x must be a finite number in \[0, 1\], got 1.5"),
        (lambda: check_float("x", "1"), TypeError, "x must be a finite number, got '1'"),
        (lambda: check_bool("b", 1), TypeError, "b must be a bool, got 1"),
    ],
)
def test_checks_name_the_argument_value_and_expectation(call, error, message):
    """TypeError for a value of the wrong type, ValueError for one out of range (as ct_torch_ref)."""
    with pytest.raises(error, match=message):
        call()


def test_checks_return_plain_python_values():
    assert type(check_int("n", np.int64(3))) is int and check_int("n", np.int64(3)) == 3
    assert type(check_float("x", np.float32(0.5))) is float and check_float("x", 2) == 2.0


def test_atomic_write_follows_the_umask_and_leaves_no_temporary(tmp_path):
    old = os.umask(0o027)
    try:
        path = io.atomic_write(tmp_path / "sub" / "file.txt", lambda tmp: Path(tmp).write_text("hello"))
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640, oct(path.stat().st_mode)
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_the_reference_checkpoint_files_follow_the_umask(tmp_path):
    import ct_torch_ref

    model = ct_torch_ref.CompressiveTransformer(num_tokens=8, dim=4, seq_len=2, depth=1, heads=1)
    old = os.umask(0o027)
    try:
        ct_torch_ref.save_pretrained(model, tmp_path)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = io.atomic_write(tmp_path / "f", lambda tmp: Path(tmp).write_text("old"))

    def crash(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        io.atomic_write(path, crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def _sleeping_writer(target: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from ct_jax import io\n"
            "def write(tmp):\n    Path(tmp).write_text('partial'); print('writing', flush=True); time.sleep(60)\n"
            "io.atomic_write(sys.argv[1], write)")
    return subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True)


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "cache.bin"
    writer = _sleeping_writer(target)
    assert writer.stdout.readline().strip() == "writing"
    live = list(tmp_path.glob(".cache.bin.*.tmp"))
    assert len(live) == 1
    assert io.remove_orphan_temps(target) == [], "a live writer's temporary must be kept"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert live[0].exists(), "SIGKILL leaves the temporary"
    io.atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"done"))
    assert [p.name for p in tmp_path.iterdir()] == ["cache.bin"]


def test_folder_lock_refuses_a_second_holder_naming_it_and_frees_on_exit(tmp_path):
    with io.folder_lock(tmp_path):
        with pytest.raises(io.FolderLockedError, match=rf"in use by another run \(holder: pid {os.getpid()} on host"):
            with io.folder_lock(tmp_path):
                pass
    with io.folder_lock(tmp_path):  # released at the end of the block
        pass


def test_folder_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = ("import sys, time; from ct_jax import io\n"
            "with io.folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(io.FolderLockedError, match=f"pid {holder.pid} "):
            with io.folder_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with io.folder_lock(tmp_path) as lock:  # the lock file stays; the lock does not
        assert f"pid {os.getpid()} " in lock.read_text()


def _write_files(**files: str):
    def write(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).write_text(text)

    return write


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replace_folder_swaps_a_whole_folder_or_leaves_the_old_one(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda first, second: False)
    target = tmp_path / "ckpt"
    io.replace_folder(target, _write_files(a="old a", b="old b"))
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "old a", "b": "old b"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~io._umask()

    def crash(folder: Path) -> None:
        (folder / "a").write_text("new a")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        io.replace_folder(target, crash)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "old a", "b": "old b"}
    io.replace_folder(target, _write_files(a="new a"))
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "new a"}, "not replaced whole"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "a temporary or the old folder was left"
    with pytest.raises(NotADirectoryError):
        io.replace_folder(target / "a", _write_files(a="x"))


def test_replace_folder_removes_the_temporary_folders_of_dead_writers(tmp_path):
    target = tmp_path / "ckpt"
    orphan = tmp_path / f".ckpt.{io._HOST}-999999999.abc.tmp"  # no such pid
    orphan.mkdir()
    (orphan / "model.safetensors").write_text("half")
    io.replace_folder(target, _write_files(a="a"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
