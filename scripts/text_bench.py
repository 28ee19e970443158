"""Text benchmark: CT against Transformer-XL on text (`ct-text-bench`; ct_jax/commands/text_bench.py)."""

import sys

if __name__ == "__main__":  # run as a file: the clone's root on sys.path, installed or not
    import _clone  # noqa: F401

from ct_jax.commands.text_bench import main

if __name__ == "__main__":
    sys.exit(main())
