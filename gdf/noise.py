"""Structured noise for training: Stage B's pyramid (multi-resolution) noise."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import _rng
from ._checks import int_at_least

__all__ = ["pyramid_noise"]


def pyramid_noise(epsilon: torch.Tensor, size_range: Sequence[int] | None = (1, 16), levels: int = 10,
                  mode: str = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
    """Add coarse noise levels to ``epsilon`` (B, C, H, W) and renormalise (Stage B training).

    For i = 1 … levels−1: m = 0.75^i, h = H // 2^i, w = W // 2^i; if h or w lies in ``size_range``
    (None: always), add ``interpolate(randn(B, C, h, w), (H, W), mode)·m``; stop after a level
    with h <= 1 or w <= 1. The result is divided by √(1 + Σ m²). Returns a new tensor.

    The reference took both h and w from the height (a defect for non-square latents); here w
    comes from the width, which is identical for square latents (all shipped Stage B configs).
    Draws: one float32 ``randn`` per added level, on ``epsilon``'s device (global RNG) or from
    ``generator`` (on its device, then moved).
    """
    if not isinstance(epsilon, torch.Tensor) or epsilon.dim() != 4:
        got = tuple(epsilon.shape) if isinstance(epsilon, torch.Tensor) else type(epsilon).__name__
        raise ValueError(f"epsilon must be a (B, C, H, W) tensor, got {got}")
    int_at_least("levels", levels, 1)
    if size_range is not None:
        if len(size_range) != 2 or not size_range[0] <= size_range[1]:
            raise ValueError(f"size_range must be None or a pair lo <= hi, got {size_range!r}")
    _rng.check_generator(generator)
    batch, channels, height, width = epsilon.shape
    epsilon = epsilon.clone()
    multipliers = [1.0]
    for i in range(1, levels):
        m = 0.75 ** i
        h, w = height // (2 ** i), width // (2 ** i)
        if h < 1 or w < 1:
            break  # nothing left to draw at this resolution (only for latents smaller than 2 px)
        if size_range is None or (size_range[0] <= h <= size_range[1] or size_range[0] <= w <= size_range[1]):
            coarse = _rng.randn((batch, channels, h, w), generator, device=epsilon.device)
            epsilon.add_(F.interpolate(coarse, size=(height, width), mode=mode) * m)
            multipliers.append(m)
        if h <= 1 or w <= 1:
            break
    return epsilon / sum(m ** 2 for m in multipliers) ** 0.5
