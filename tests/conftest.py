"""Test-wide settings, applied before JAX initialises, and the runtime check of type annotations."""

import os

import jaxtyping
import pytest

# Every annotated function and dataclass of both packages checks its arguments and result at
# run time (jaxtyping shapes included, consistent across one call; under jit at trace time).
# Must run before either package is imported. PEP 484's numeric tower: an int is a float.
jaxtyping.install_import_hook(
    ["ct_jax", "ct_torch_ref"], "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"
)

from ct_jax.training import xla_flags  # noqa: E402  (after the hook; importing starts no JAX backend)

# Tests compile many tiny programs; ct_jax.training.FAST_CPU_COMPILE compiles them 2-3x
# faster and computes the same HLO (benchmarks and scripts keep the defaults).
os.environ.setdefault("XLA_FLAGS", xla_flags())
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
