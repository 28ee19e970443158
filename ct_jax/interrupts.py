"""A graceful stop on SIGINT / SIGTERM: training finishes its step, writes a checkpoint, then stops.

Clusters and preemptible machines send SIGTERM before killing a job; Ctrl-C sends SIGINT.
While a `StopSignals` block is active (main thread only: Python delivers signals there) the
first of either is recorded instead of raising, and the default action is restored, so a
second one ends the process at once. All processes of a multi-process run agree on the step
at which they stop (`requested` gathers every process's flag).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; `exit_status` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted ({signal.Signals(signum).name}) at step {step}: checkpoint {checkpoint} "
                         "written; rerun the same command to resume")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager recording the first SIGINT / SIGTERM (`requested`); a second one aborts the process."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._record) for signum in SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        for other in SIGNALS:  # the default action again: a second signal ends the process at once
            signal.signal(other, signal.SIG_DFL)
        name = signal.Signals(signum).name
        os.write(2, f"\n{name}: finishing the current step and writing a checkpoint (send it again to abort "
                    "now, without one)\n".encode())

    def requested(self) -> int:
        """The signal number some process received (0: none); every process must call it at the same step."""
        if jax.process_count() == 1:
            return self.signum
        return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))
