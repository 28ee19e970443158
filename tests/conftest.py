"""Test-wide settings, applied before JAX initialises, and the runtime check of type annotations."""

import os

import jaxtyping
import pytest

# Tests compile many tiny programs; XLA's CPU backend at optimisation level 0 compiles them
# about 3x faster and computes the same HLO (benchmarks and scripts keep the defaults).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:  # tiny tensors: on 2 busy cores torch's default thread pool makes tests ~16x slower
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass


@pytest.fixture
def unchecked_types():
    """The runtime type check switched off, for tests of the packages' own TypeError messages
    (which users get, and which the checker would otherwise pre-empt with its own)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)
