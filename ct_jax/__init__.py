"""Compressive Transformer in JAX / Flax NNX, weight-compatible with the PyTorch upstream.

Every public submodule (`ct_jax.training`, `ct_jax.evaluation`, ...) and the names below are
reachable after `import ct_jax`, imported on first use (PEP 562), so `import ct_jax` stays
cheap: JAX loads with the first module that needs it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see of the lazy names below (`X as X`: a re-export)
    from ct_jax.config import ModelConfig as ModelConfig
    from ct_jax.memory import Memory as Memory
    from ct_jax.model import CompressiveTransformer as CompressiveTransformer

# name -> the submodule that defines it
_NAMES = {"CompressiveTransformer": "model", "Memory": "memory", "ModelConfig": "config"}
# every module and package of ct_jax whose name has no leading underscore, found on disk
_MODULES = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))

__all__ = sorted([*_NAMES, *_MODULES])


def __getattr__(name: str) -> Any:
    """Imports a public submodule, or the module defining a public name, on first access."""
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it as an attribute of the package
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
