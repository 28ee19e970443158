"""Host values (numpy arrays, lists, scalars) onto the device without compiling anything."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_device(value: Any) -> jax.Array:
    """`value` as a JAX array, as `jnp.asarray(value)` gives it (dtypes canonicalised alike); a JAX array (or a
    tracer) passes through. Outside a trace jax 0.10's `jnp.asarray` lifts a host value through a compiled
    identity, one compile per shape and dtype; `jax.device_put` copies it."""
    return value if isinstance(value, jax.Array) else jax.device_put(np.asarray(value))
