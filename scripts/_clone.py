"""Puts this clone's root first on sys.path, so that `python scripts/NAME.py` runs the clone's ct_jax
whether or not the package is installed (installed, the same commands are `ct-NAME`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
