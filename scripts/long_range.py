"""Long-range benchmark of the compressed memory (`ct-long-range`; ct_jax/commands/long_range.py)."""

if __name__ == "__main__":  # run as a file: the clone's root on sys.path, installed or not
    import _clone  # noqa: F401

from ct_jax.commands.long_range import main, parse_args  # noqa: F401  (parse_args: for tests that load this file)

if __name__ == "__main__":
    main()
