"""Long-range benchmark of the compressed memory (`ct-long-range`; ct_jax/commands/long_range.py)."""

import sys

if __name__ == "__main__":  # run as a file: the clone's root on sys.path, installed or not
    import _clone  # noqa: F401

from ct_jax.commands.long_range import console_main, main, parse_args  # noqa: F401  (main, parse_args: for tests)

if __name__ == "__main__":
    sys.exit(console_main())
