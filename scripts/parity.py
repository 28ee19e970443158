"""Run ct_torch_ref and ct_jax on the same weights, print a table (`ct-parity`; ct_jax/commands/parity.py)."""

import sys

if __name__ == "__main__":  # run as a file: the clone's root on sys.path, installed or not
    import _clone  # noqa: F401

from ct_jax.commands.parity import main, parse_args  # noqa: F401  (parse_args: for tests that load this file)

if __name__ == "__main__":
    sys.exit(main())
