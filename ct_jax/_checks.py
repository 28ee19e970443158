"""Argument checks shared by the package: each names the argument, the value and what is expected
(TypeError for a value of the wrong type, ValueError for one out of range) and returns the value
normalised (Python int / float / bool)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def check_int(name: str, value: Any, minimum: int | None = 1, *, below: int | None = None) -> int:
    """`value` as an int (Python or numpy integer, never bool) with `minimum <= value < below`."""
    integral = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if integral and (minimum is None or value >= minimum) and (below is None or value < below):
        return int(value)
    if below is not None:
        expected = f"an int in [{minimum}, {below})"
    elif minimum is None:
        expected = "an int"
    else:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise (ValueError if integral else TypeError)(f"{name} must be {expected}, got {value!r}")


def check_float(
    name: str, value: Any, minimum: float | None = None, *, below: float | None = None, maximum: float | None = None
) -> float:
    """`value` as a finite float (int or float, never bool) with `minimum <= value < below` and `<= maximum`."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    in_range = (minimum is None or value >= minimum) and (below is None or value < below) and (
        maximum is None or value <= maximum)
    if real and math.isfinite(value) and in_range:
        return float(value)
    if below is not None:
        expected = f"a finite number in [{minimum:g}, {below:g})"
    elif maximum is not None:
        expected = f"a finite number in [{minimum:g}, {maximum:g}]"
    else:
        expected = "a finite number" + ("" if minimum is None else f" >= {minimum:g}")
    raise (ValueError if real else TypeError)(f"{name} must be {expected}, got {value!r}")


def check_bool(name: str, value: Any) -> bool:
    """`value` itself, which must be a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """`value` itself, which must be one of the strings `allowed`."""
    listed = ", ".join(repr(a) for a in allowed)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {listed} (a str), got {value!r}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value
