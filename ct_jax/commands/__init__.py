"""The command-line tools, one module each: `parse_args(argv)` and `main(argv)` (the `ct-*` console
scripts of pyproject.toml; scripts/*.py runs them from a clone)."""
