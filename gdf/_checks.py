"""Argument validation shared by the gdf components (each error names the offending argument)."""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch

__all__ = ["pair", "unit_interval_range", "positive", "int_at_least", "tensor_arg"]


def pair(name: str, value: Sequence[float], increasing: bool = True) -> tuple[float, float]:
    """Return ``value`` as a (lo, hi) pair of finite floats; with ``increasing`` require lo < hi."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers [lo, hi], got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must contain finite numbers, got {value!r}")
    if increasing and not lo < hi:
        raise ValueError(f"{name} must satisfy lo < hi, got {value!r}")
    return lo, hi


def unit_interval_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    """Return ``value`` as (lo, hi) with 0 < lo < hi < 1 (a clamp range for a variance)."""
    lo, hi = pair(name, value)
    if not (0.0 < lo < hi < 1.0):
        raise ValueError(f"{name} must lie strictly inside (0, 1) with lo < hi, got {value!r}")
    return lo, hi


def positive(name: str, value: float) -> float:
    """Return ``value`` as a float, requiring a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def int_at_least(name: str, value: int, minimum: int) -> int:
    """Return ``value`` requiring a Python int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def tensor_arg(name: str, value: object) -> torch.Tensor:
    """Require ``value`` to be a tensor."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value
