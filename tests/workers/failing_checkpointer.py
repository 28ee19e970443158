"""Worker of tests/test_interrupts.py: the train command with a checkpointer that fails mid-run.

    python -m tests.workers.failing_checkpointer TRAIN_FLAGS...

The second checkpoint save finds its orbax manager closed, as when a save thread died: the
save raises "cannot schedule new futures after shutdown" and orbax's worker threads are left
waiting forever. The run must still end, with its one-line error and a non-zero status.
"""

from __future__ import annotations

import sys

import orbax.checkpoint as ocp

from ct_jax.commands import train

_real_save = ocp.CheckpointManager.save
_calls: list[int] = []


def _failing_save(self: ocp.CheckpointManager, *args: object, **kwargs: object) -> object:
    _calls.append(1)
    if len(_calls) == 2:
        self.close()
    return _real_save(self, *args, **kwargs)


if __name__ == "__main__":
    ocp.CheckpointManager.save = _failing_save
    sys.exit(train.main())  # argv None: the process is the command, so an error ends it (cli.command)
