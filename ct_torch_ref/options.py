"""The paper-faithful options (Rae et al. 2019, Sonnet v1): allowed values, defaults first.

Each default is upstream 0.4.0's behaviour; docs/paper-options.md defines every value.
ct_jax.options holds the same table (kept equal by tests/test_paper_options.py).
"""

from __future__ import annotations

from typing import Any

OPTIONS: dict[str, tuple[str, ...]] = {
    "compression": ("conv", "mean_pool", "max_pool", "dilated_conv", "most_used"),
    "reconstruction_target": ("memory", "evicted"),
    "aux_loss": ("attention", "autoencoder", "none"),
    "eviction_padding": ("upstream", "exact"),
    "relative_positions": ("learned", "sinusoidal"),
}
DEFAULTS: dict[str, str] = {name: allowed[0] for name, allowed in OPTIONS.items()}


def check_option(name: str, value: Any) -> str:
    """Returns value if it is an allowed value of option `name`; else ValueError (TypeError for
    a non-string), naming the option and listing the allowed values."""
    listed = ", ".join(repr(a) for a in OPTIONS[name])
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {listed} (a str); got {value!r}")
    if value not in OPTIONS[name]:
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value
