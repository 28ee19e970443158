"""Test-wide settings, applied before JAX initialises."""

import os

from ct_jax.training import xla_flags

# Tests compile many tiny programs; ct_jax.training.FAST_CPU_COMPILE compiles them 2-3x
# faster and computes the same HLO (benchmarks and scripts keep the defaults).
os.environ.setdefault("XLA_FLAGS", xla_flags())
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:  # tiny tensors: on 2 busy cores torch's default thread pool makes tests ~16x slower
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass
