"""Expensive fixtures computed once per test run: under pytest-xdist a module-scoped fixture runs in every
worker that gets one of the module's tests, so a fixture of subprocess runs would run twice. The first
worker to ask computes; the others wait on a file lock and read its result (pytest-xdist's documented
pattern for session fixtures)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock


def shared_folder(tmp_path_factory: Any, name: str) -> Path:
    """A folder that every worker of this run gets (the process's own when not under xdist)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp(name)
    folder = tmp_path_factory.getbasetemp().parent / name  # the run's folder, above each worker's own
    folder.mkdir(exist_ok=True)
    return folder


def computed_once(folder: Path, name: str, compute: Callable[[Path], Any]) -> Any:
    """`compute(its own folder inside folder)`'s result (JSON: lists for tuples, strings for paths), made by
    one worker of the run; a failed computation is redone by the next worker that asks."""
    done, work = folder / f"{name}.json", folder / name
    with FileLock(str(folder / f"{name}.lock")):
        if done.is_file():
            return json.loads(done.read_text())
        shutil.rmtree(work, ignore_errors=True)  # a failed attempt's files
        work.mkdir()
        text = json.dumps(compute(work))
        done.write_text(text)
        return json.loads(text)
