"""Worker of tests/test_script_errors.py: a command that fails while a non-daemon thread still runs (as an
orbax or tensorstore worker may), run as a process of its own (`main()` with no argv, as scripts/*.py do).

    python -m tests.workers.failing_command [--debug]   # raises after starting the thread
    python -m tests.workers.failing_command --wait      # waits for a Ctrl-C (SIGINT) instead

`ct_jax.cli.command` must print one line (or the traceback with --debug) and end the process with exit
status 1 (130 for Ctrl-C) at once; without it the interpreter would wait for the thread (600 s).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from ct_jax import cli


@cli.command
def main(argv: list[str] | None = None) -> int:
    wait = "--wait" in (argv or sys.argv[1:])
    if wait:
        # Python keeps SIGINT ignored when it starts with it ignored, and the test's pytest worker sometimes passes
        # it on so (measured: SIGINT and SIGQUIT set in this process's SigIgn, the mark of C's system() running in
        # another thread of the parent, and the test hung)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
    print("started", flush=True)
    if wait:
        time.sleep(600)
    raise RuntimeError("cannot schedule new futures after shutdown")


if __name__ == "__main__":
    sys.exit(main())
