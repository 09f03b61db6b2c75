"""Noise conditions: logSNR λ → the scalar fed to the network (Stable Cascade: r ≈ t)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._checks import int_at_least, pair, positive
from .schedules_piecewise import stable_diffusion_table

__all__ = [
    "BaseNoiseCond",
    "CosineTNoiseCond",
    "EDMNoiseCond",
    "SigmoidNoiseCond",
    "LogSNRNoiseCond",
    "EDMSigmaNoiseCond",
    "RectifiedFlowsNoiseCond",
    "PiecewiseLinearNoiseCond",
    "StableDiffusionNoiseCond",
    "DiscreteNoiseCond",
]


class BaseNoiseCond:
    """``__call__(λ)`` = clamp(cond(λ + 2·log(shift)), clamp_range).

    Note the sign: a shift here ADDS 2·log(shift), the opposite of the schedule's shift.
    ``clamp_range`` defaults to [−1e9, 1e9].
    """

    def __init__(self, shift: float = 1, clamp_range: Sequence[float] | None = None):
        self.shift = positive("shift", shift)
        self.clamp_range = [-1e9, 1e9] if clamp_range is None else list(pair("clamp_range", clamp_range))

    def cond(self, logSNR: torch.Tensor) -> torch.Tensor:
        """The unclamped condition for ``logSNR``."""
        raise NotImplementedError

    def __call__(self, logSNR: torch.Tensor) -> torch.Tensor:
        """The (shifted, clamped) condition for ``logSNR``."""
        if self.shift != 1:
            logSNR = logSNR + 2 * float(np.log(self.shift))  # a copy: the caller's λ is untouched
        return self.cond(logSNR).clamp(*self.clamp_range)


class CosineTNoiseCond(BaseNoiseCond):
    """Inverse of CosineSchedule: the t whose cosine-schedule λ equals the input (Stable Cascade).

    t = acos(√(clamp(sigmoid(λ), 0, 1)·min_var))/(π/2)·(1+s) − s, clamped to ``clamp_range``
    (default [0, 1]). Unlike the reference, an explicit ``clamp_range`` is honoured (the reference
    silently replaced it with [0, 1]); the default behaviour is identical.
    """

    def __init__(self, s: float = 0.008, clamp_range: Sequence[float] = (0, 1), shift: float = 1):
        super().__init__(shift=shift, clamp_range=clamp_range)
        self.s = torch.tensor([float(s)])
        self.min_var = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2

    def cond(self, logSNR):
        var = logSNR.sigmoid().clamp(0, 1)
        s, min_var = self.s.to(var.device), self.min_var.to(var.device)
        return (((var * min_var) ** 0.5).acos() / (torch.pi * 0.5)) * (1 + s) - s


class EDMNoiseCond(BaseNoiseCond):
    """−λ/8."""

    def cond(self, logSNR):
        return -logSNR / 8


class SigmoidNoiseCond(BaseNoiseCond):
    """sigmoid(−λ)."""

    def cond(self, logSNR):
        return (-logSNR).sigmoid()


class LogSNRNoiseCond(BaseNoiseCond):
    """λ itself."""

    def cond(self, logSNR):
        return logSNR


class EDMSigmaNoiseCond(BaseNoiseCond):
    """σ·sigma_data = exp(−λ/2)·sigma_data."""

    def __init__(self, sigma_data: float = 1, shift: float = 1, clamp_range: Sequence[float] | None = None):
        super().__init__(shift=shift, clamp_range=clamp_range)
        self.sigma_data = float(sigma_data)

    def cond(self, logSNR):
        return torch.exp(-logSNR / 2) * self.sigma_data


class RectifiedFlowsNoiseCond(BaseNoiseCond):
    """The LERP scaler's ``a`` for λ."""

    def cond(self, logSNR):
        u = logSNR.exp() - 1
        u[u == 0] = 1e-3
        return 1 + (2 - (2 ** 2 + 4 * u) ** 0.5) / (2 * u)


class PiecewiseLinearNoiseCond(BaseNoiseCond):
    """Inverse of a piecewise-linear variance table: interpolate knots ``x`` at v = sigmoid(λ).

    idx = (len(x) − 2) − searchsorted(flip(y)[:−2], v) (``y`` must be decreasing).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, shift: float = 1,
                 clamp_range: Sequence[float] | None = None):
        super().__init__(shift=shift, clamp_range=clamp_range)
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.float32)
        if x.dim() != 1 or x.numel() < 3 or x.shape != y.shape:
            raise ValueError(f"x and y must be 1-D tensors of equal length >= 3, got {tuple(x.shape)} and {tuple(y.shape)}")
        self.x, self.y = x, y

    @staticmethod
    def piecewise_linear(v: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Interpolate ``xs`` at the values ``v`` of the decreasing table ``ys``."""
        idx = (len(xs) - 2) - torch.searchsorted(ys.flip(dims=(-1,))[:-2], v.contiguous())
        x_min, x_max = xs[idx], xs[idx + 1]
        y_min, y_max = ys[idx], ys[idx + 1]
        return x_min + (x_max - x_min) * (v - y_min) / (y_max - y_min)

    def cond(self, logSNR):
        v = logSNR.sigmoid()
        return self.piecewise_linear(v, self.x.to(v.device), self.y.to(v.device))


class StableDiffusionNoiseCond(PiecewiseLinearNoiseCond):
    """The t of Stable Diffusion's table for λ, clamped to [0, 1]."""

    def __init__(self, linear_range: Sequence[float] = (0.00085, 0.012), total_steps: int = 1000,
                 shift: float = 1, clamp_range: Sequence[float] | None = None):
        self.linear_range = list(linear_range)
        self.total_steps = total_steps
        x, y = stable_diffusion_table(linear_range, total_steps)
        super().__init__(x, y, shift=shift, clamp_range=clamp_range)

    def cond(self, logSNR):
        return super().cond(logSNR).clamp(0, 1)


class DiscreteNoiseCond(BaseNoiseCond):
    """Integer step index: int64(((noise_cond(λ) − lo)/(hi − lo))·steps) over ``continuous_range``."""

    def __init__(self, noise_cond: BaseNoiseCond, steps: int = 1000,
                 continuous_range: Sequence[float] = (0, 1), shift: float = 1,
                 clamp_range: Sequence[float] | None = None):
        super().__init__(shift=shift, clamp_range=clamp_range)
        if not isinstance(noise_cond, BaseNoiseCond):
            raise ValueError(f"noise_cond must be a BaseNoiseCond, got {type(noise_cond).__name__}")
        self.noise_cond = noise_cond
        self.steps = int_at_least("steps", steps, 1)
        self.continuous_range = list(pair("continuous_range", continuous_range))

    def cond(self, logSNR):
        cond = self.noise_cond(logSNR)
        lo, hi = self.continuous_range
        return ((cond - lo) / (hi - lo) * self.steps).long()

    def __call__(self, logSNR: torch.Tensor) -> torch.Tensor:
        """The int64 step index (clamped with integer bounds so the dtype stays int64; the
        reference's float clamp turned it into float32 with the same values)."""
        if self.shift != 1:
            logSNR = logSNR + 2 * float(np.log(self.shift))
        lo, hi = self.clamp_range
        return self.cond(logSNR).clamp(int(np.ceil(lo)), int(np.floor(hi)))
