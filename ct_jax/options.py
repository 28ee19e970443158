"""The paper-faithful options (Rae et al. 2019, Sonnet v1): one `StrEnum` per option, default first.

Each default is upstream 0.4.0's behaviour; docs/paper-options.md defines every value.
A member equals its string (`Compression.CONV == "conv"`) and is one in JSON, so configs
written as strings read and compare as before. ct_torch_ref.options holds the same enums
(it does not import ct_jax; tests/test_paper_options.py keeps the tables equal).
"""

from __future__ import annotations

import enum
from typing import Any


class Option(enum.StrEnum):
    """A string-valued option; repr shows the plain string, as configs and messages did before the enums."""

    def __repr__(self) -> str:
        return repr(self.value)


class Compression(Option):
    CONV = "conv"
    MEAN_POOL = "mean_pool"
    MAX_POOL = "max_pool"
    DILATED_CONV = "dilated_conv"
    MOST_USED = "most_used"


class ReconstructionTarget(Option):
    MEMORY = "memory"
    EVICTED = "evicted"


class AuxLoss(Option):
    ATTENTION = "attention"
    AUTOENCODER = "autoencoder"
    NONE = "none"


class EvictionPadding(Option):
    UPSTREAM = "upstream"
    EXACT = "exact"


class RelativePositions(Option):
    LEARNED = "learned"
    SINUSOIDAL = "sinusoidal"


ENUMS: dict[str, type[Option]] = {
    "compression": Compression,
    "reconstruction_target": ReconstructionTarget,
    "aux_loss": AuxLoss,
    "eviction_padding": EvictionPadding,
    "relative_positions": RelativePositions,
}
OPTIONS: dict[str, tuple[str, ...]] = {name: tuple(m.value for m in enum_) for name, enum_ in ENUMS.items()}
DEFAULTS: dict[str, str] = {name: allowed[0] for name, allowed in OPTIONS.items()}


def check_option(name: str, value: Any) -> Option:
    """The enum member of option `name` for `value` (a member or its string); else ValueError (TypeError for
    a non-string), naming the option and listing the allowed values."""
    listed = ", ".join(repr(a) for a in OPTIONS[name])
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {listed} (a str); got {value!r}")
    if value not in OPTIONS[name]:
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return ENUMS[name](value)
