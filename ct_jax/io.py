"""Files and folders that are complete or absent (`atomic_write`, `replace_folder`), and one process per output
folder (`folder_lock`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = ".lock"
_HOST = socket.gethostname().replace(".", "_")


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else set back at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _temp_pattern(path: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(path.name)}\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]*\.tmp")


def remove_orphan_temps(path: str | os.PathLike) -> list[Path]:
    """Removes temporaries of `path` left by dead processes of this host (e.g. a SIGKILL mid-write)."""
    path = Path(path)
    pattern, removed = _temp_pattern(path), []
    with contextlib.suppress(FileNotFoundError):
        for entry in path.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and match["host"] == _HOST and not _pid_alive(int(match["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_dir() and not entry.is_symlink():  # a folder of `replace_folder`
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed.append(entry)
    return removed


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems cannot fsync a directory
        if not (directory and error.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Calls `write(tmp)` on a temporary file beside `path`, then renames it over `path`.

    A crash leaves the old file or the new one, never half of one: the data is flushed to
    disk (fsync) before the rename, and the rename before returning. The file gets the
    permissions the user's umask gives a new file; a failed write removes the temporary,
    and temporaries of dead processes (killed mid-write) are removed on the next write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync(path.parent, directory=True)
    return path


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if rename(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_folder(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Calls `write(tmp)` on a new temporary folder beside `path`, then puts it in place of `path` (absent, or a
    folder, which is removed).

    A crash leaves the old folder or the new one, never a mix: the files are flushed to disk, then the
    two folders are swapped in one step where the filesystem can (Linux), else by two renames, between
    which a crash leaves the old folder beside `path` as `.NAME.HOST-PID.replaced`. The folder gets the
    permissions the user's umask gives a new folder; temporaries of dead processes are removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder to replace")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        for entry in tmp.iterdir():
            if entry.is_file():
                _fsync(entry)
        _fsync(tmp, directory=True)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # now the old folder
        else:
            old = path.parent / f".{path.name}.{_HOST}-{os.getpid()}.replaced"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent, directory=True)
    return path


class FolderLockedError(RuntimeError):
    """Another live process holds the output folder."""


@contextlib.contextmanager
def folder_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Holds an exclusive `flock` on `directory/.lock` for the block, or raises FolderLockedError.

    The kernel drops the lock when its holder exits in any way (SIGKILL included), so a lock
    file left by a dead process is taken over. The file records the holder's pid and host.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown (starting up)"
            raise FolderLockedError(
                f"{directory} is in use by another run (holder: {holder}); wait for it to finish, or use "
                f"another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
