"""Schedules defined by a table of variances: piecewise-linear interpolation, Stable Diffusion's."""
from __future__ import annotations

from typing import Sequence

import torch

from ._checks import int_at_least, pair
from .schedules import BaseSchedule

__all__ = ["PiecewiseLinearSchedule", "StableDiffusionSchedule", "stable_diffusion_table"]


def stable_diffusion_table(linear_range: Sequence[float], total_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots x = linspace(0, 1, total_steps+1) and cumulative alphas y of SD's "scaled linear" betas."""
    lo, hi = pair("linear_range", linear_range)
    int_at_least("total_steps", total_steps, 1)
    sqrt_lo, sqrt_hi = lo ** 0.5, hi ** 0.5
    x = torch.linspace(0, 1, total_steps + 1)
    alphas = 1 - (sqrt_lo * (1 - x) + sqrt_hi * x) ** 2
    return x, alphas.cumprod(dim=-1)


class PiecewiseLinearSchedule(BaseSchedule):
    """Variance linearly interpolated between knots ``x`` (increasing t) and values ``y``.

    idx = searchsorted(x[:−1], t) − 1 (t = 0 wraps to the last knot and still yields y[0]);
    λ = log(var/(1 − var)).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, **base_kwargs):
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.float32)
        if x.dim() != 1 or x.numel() < 2 or x.shape != y.shape:
            raise ValueError(f"x and y must be 1-D tensors of equal length >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
        if not bool((x[1:] > x[:-1]).all()):
            raise ValueError("x must be strictly increasing")
        self.x, self.y = x, y
        super().__init__(**base_kwargs)

    @staticmethod
    def piecewise_linear(t: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Interpolate ``ys`` at ``t`` over knots ``xs`` (the reference's indexing rule)."""
        idx = torch.searchsorted(xs[:-1], t.contiguous()) - 1
        x_min, x_max = xs[idx], xs[idx + 1]
        y_min, y_max = ys[idx], ys[idx + 1]
        return y_min + (y_max - y_min) * (t - x_min) / (x_max - x_min)

    def schedule(self, t, batch_size, generator=None):
        if t is None:
            t = self._random_t(batch_size, generator)
        var = self.piecewise_linear(t, self.x.to(t.device), self.y.to(t.device))
        return (var / (1 - var)).log()


class StableDiffusionSchedule(PiecewiseLinearSchedule):
    """Stable Diffusion's discrete schedule (scaled-linear betas) as a continuous piecewise-linear one."""

    def __init__(self, linear_range: Sequence[float] = (0.00085, 0.012), total_steps: int = 1000, **base_kwargs):
        self.linear_range = list(linear_range)
        self.total_steps = total_steps
        x, y = stable_diffusion_table(linear_range, total_steps)
        super().__init__(x, y, **base_kwargs)
