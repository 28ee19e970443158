"""Convert weights between PyTorch files and checkpoint directories (`ct-convert`; ct_jax/commands/convert.py)."""

import sys

if __name__ == "__main__":  # run as a file: the clone's root on sys.path, installed or not
    import _clone  # noqa: F401

from ct_jax.commands.convert import main, parse_args  # noqa: F401  (parse_args: for tests that load this file)

if __name__ == "__main__":
    sys.exit(main())
