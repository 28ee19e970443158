"""Test-wide settings, applied before JAX initialises, and the runtime check of type annotations."""

import gc
import os
import shutil
import tempfile

import jax
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

# One compilation cache for the whole run: both xdist workers and every subprocess they start compile
# many of the same small programs. Made by the process that starts the run (the workers inherit it) and
# removed when the run ends; a cache the caller names is used and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ct-jax-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Tracing and lowering make millions of short-lived objects: the default collection thresholds
# run full collections over every imported module's objects many times a test. Frozen imports
# and rarer collections make the suite 10-15% faster (tests/test_parity.py: 71 s -> 60 s).
gc.freeze()
gc.set_threshold(200_000, 50, 1000)

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


def pytest_unconfigure(config):
    """Everything left frozen: pytest's end-of-run check for unraisable exceptions then runs 5 full collections,
    which would walk every compiled program and cached model of the run (1-4 s per process)."""
    gc.freeze()


def pytest_sessionfinish(session):
    """The run's compilation cache removed by the process that made it (not by the workers)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
