"""Noise schedules: map a time t in [0, 1] (0 clean, 1 pure noise) to logSNR λ = log(α²/σ²).

All schedule math is float32 on the device of ``t``; random t is drawn with the global RNG exactly
as the reference does (one ``torch.rand(B)`` call) unless a ``torch.Generator`` is given.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from . import _rng
from ._checks import int_at_least, pair, positive, unit_interval_range

__all__ = [
    "BaseSchedule",
    "CosineSchedule",
    "CosineSchedule2",
    "SqrtSchedule",
    "RectifiedFlowsSchedule",
    "EDMSampleSchedule",
    "EDMTrainSchedule",
    "LinearSchedule",
    "InterpolatedSchedule",
]

class BaseSchedule:
    """Common machinery: discretisation, shift and the clamp to the limits λ(t=1)..λ(t=0).

    Subclasses set their own attributes, then call ``super().__init__`` and implement
    ``schedule(t, batch_size, generator=None)`` (``t`` is None when t must be sampled).

    Args:
        force_limits: compute ``limits`` = [λ(1), λ(0)] at shift 1 and clamp every result to it.
        discrete_steps: if set, float t is snapped to ``round(t·(n−1))/(n−1)``; long t is a step index.
        shift: a schedule-level shift multiplied with the per-call ``shift``.
    """

    #: False for schedules that only sample λ themselves (they reject a given t).
    accepts_t: bool = True

    def __init__(self, *, force_limits: bool = True, discrete_steps: int | None = None, shift: float = 1):
        if discrete_steps is not None:
            int_at_least("discrete_steps", discrete_steps, 2)
        self.shift = positive("shift", shift)
        self.discrete_steps = discrete_steps
        self.limits: list[float] | None = None
        if force_limits:
            self.reset_limits()

    def reset_limits(self, shift: float = 1, disable: bool = False) -> list[float] | None:
        """Recompute ``limits`` = [λ(t=1), λ(t=0)] at ``shift`` (or clear them with ``disable``).

        Schedules that cannot evaluate a given t get a warning and no limits, as in the reference.
        The previous limits are cleared before the evaluation so they do not clip the new ones.
        """
        self.limits = None
        if disable:
            return None
        if not self.accepts_t:
            warnings.warn(f"{type(self).__name__} does not accept t: no limits are set", stacklevel=2)
            return None
        self.limits = self(torch.tensor([1.0, 0.0]), shift=shift).tolist()
        return self.limits

    def schedule(self, t: torch.Tensor | None, batch_size: int | None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Return λ for ``t`` (or for ``batch_size`` randomly drawn t when ``t`` is None)."""
        raise NotImplementedError

    def __call__(self, t: torch.Tensor | int | Sequence[float], shift: float = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """λ for the times ``t`` (a tensor), or for ``t`` randomly sampled times (an int).

        Returns a float32 tensor on ``t``'s device (random t: CPU, or the generator's device).
        """
        positive("shift", shift)
        _rng.check_generator(generator)
        if isinstance(t, (list, tuple)):
            t = torch.tensor(t, dtype=torch.float32)
        if isinstance(t, torch.Tensor):
            if self.discrete_steps is not None:
                if t.dtype != torch.long:
                    t = (t * (self.discrete_steps - 1)).round().long()
                t = t / (self.discrete_steps - 1)
            # float32 everywhere: a float64 t must not leak float64 into bf16 training runs
            t = t.to(torch.float32).clamp(0, 1)
            batch_size = None
        elif isinstance(t, int) and not isinstance(t, bool):
            int_at_least("t (batch size)", t, 1)
            batch_size, t = t, None
        else:
            raise ValueError(f"t must be a tensor of times or an int batch size, got {type(t).__name__}")
        logSNR = self.schedule(t, batch_size, generator=generator)
        total_shift = shift * self.shift
        if total_shift != 1:
            logSNR = logSNR + 2 * float(np.log(1 / total_shift))
        if self.limits is not None:
            logSNR = logSNR.clamp(*self.limits)
        return logSNR

    def _random_t(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        # the generic rule of every schedule except CosineSchedule: t = 1 - rand(B)
        return 1 - _rng.rand(batch_size, generator)

def _variance_to_logsnr(var: torch.Tensor, clamp_range: Sequence[float], norm_instead: bool) -> torch.Tensor:
    # clamp (or squash) the variance BEFORE the logit, as the reference does
    if norm_instead:
        var = var * (clamp_range[1] - clamp_range[0]) + clamp_range[0]
    else:
        var = var.clamp(*clamp_range)
    return (var / (1 - var)).log()

class CosineSchedule(BaseSchedule):
    """The cosine schedule used by Stable Cascade.

    var = clamp(cos((s+t)/(1+s)·π/2), 0, 1)² / cos(s/(1+s)·π/2)², clamped to ``clamp_range`` (or
    linearly squashed into it with ``norm_instead``); λ = log(var/(1−var)). Random t =
    clamp((1 − rand(B)) + 0.001, 0.001, 1). Default limits: [−9.210240, 9.210074].
    """

    def __init__(self, s: float = 0.008, clamp_range: Sequence[float] = (0.0001, 0.9999),
                 norm_instead: bool = False, **base_kwargs):
        self.s = torch.tensor([float(s)])
        self.clamp_range = list(unit_interval_range("clamp_range", clamp_range))
        self.norm_instead = bool(norm_instead)
        self.min_var = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2
        super().__init__(**base_kwargs)

    def schedule(self, t, batch_size, generator=None):
        if t is None:
            t = (1 - _rng.rand(batch_size, generator)).add(0.001).clamp(0.001, 1.0)
        s, min_var = self.s.to(t.device), self.min_var.to(t.device)
        var = torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var
        return _variance_to_logsnr(var, self.clamp_range, self.norm_instead)

class CosineSchedule2(BaseSchedule):
    """λ = −2·log(tan(t_min + t·(t_max − t_min))) spanning ``logsnr_range``."""

    def __init__(self, logsnr_range: Sequence[float] = (-15, 15), **base_kwargs):
        lo, hi = pair("logsnr_range", logsnr_range)
        self.t_min = float(np.arctan(np.exp(-0.5 * hi)))
        self.t_max = float(np.arctan(np.exp(-0.5 * lo)))
        super().__init__(**base_kwargs)

    def schedule(self, t, batch_size, generator=None):
        if t is None:
            t = self._random_t(batch_size, generator)
        return -2 * (self.t_min + t * (self.t_max - self.t_min)).tan().log()

class SqrtSchedule(BaseSchedule):
    """var = 1 − √(t + s), clamped (or squashed) into ``clamp_range``; λ = log(var/(1−var))."""

    def __init__(self, s: float = 1e-4, clamp_range: Sequence[float] = (0.0001, 0.9999),
                 norm_instead: bool = False, **base_kwargs):
        self.s = float(s)
        self.clamp_range = list(unit_interval_range("clamp_range", clamp_range))
        self.norm_instead = bool(norm_instead)
        super().__init__(**base_kwargs)

    def schedule(self, t, batch_size, generator=None):
        if t is None:
            t = self._random_t(batch_size, generator)
        var = 1 - (t + self.s) ** 0.5
        return _variance_to_logsnr(var, self.clamp_range, self.norm_instead)

class RectifiedFlowsSchedule(BaseSchedule):
    """λ = clamp(log((1−t)²/t²), logsnr_range)."""

    def __init__(self, logsnr_range: Sequence[float] = (-15, 15), **base_kwargs):
        self.logsnr_range = list(pair("logsnr_range", logsnr_range))
        super().__init__(**base_kwargs)

    def schedule(self, t, batch_size, generator=None):
        if t is None:
            t = self._random_t(batch_size, generator)
        logSNR = (((1 - t) ** 2) / (t ** 2)).log()
        return logSNR.clamp(*self.logsnr_range)

class EDMSampleSchedule(BaseSchedule):
    """Karras et al. sampling schedule: σ interpolated in σ^(1/p) space; λ = log(1/σ²)."""

    def __init__(self, sigma_range: Sequence[float] = (0.002, 80), p: float = 7, **base_kwargs):
        lo, hi = pair("sigma_range", sigma_range)
        if lo <= 0:
            raise ValueError(f"sigma_range must be positive, got {sigma_range!r}")
        self.sigma_range = [lo, hi]
        self.p = positive("p", p)
        super().__init__(**base_kwargs)

    def schedule(self, t, batch_size, generator=None):
        if t is None:
            t = self._random_t(batch_size, generator)
        smin, smax, p = self.sigma_range[0], self.sigma_range[1], self.p
        sigma = (smax ** (1 / p) + (1 - t) * (smin ** (1 / p) - smax ** (1 / p))) ** p
        return (1 / sigma ** 2).log()

class EDMTrainSchedule(BaseSchedule):
    """EDM training distribution: λ = −2·(randn(B)·std − mu). Only samples; a given t is an error."""

    accepts_t = False

    def __init__(self, mu: float = -1.2, std: float = 1.2, **base_kwargs):
        self.mu = float(mu)
        self.std = positive("std", std)
        super().__init__(**base_kwargs)

    def schedule(self, t, batch_size, generator=None):
        if t is not None:
            raise ValueError("t must be None for EDMTrainSchedule (it samples logSNR itself)")
        return -2 * (_rng.randn((batch_size,), generator) * self.std - self.mu)

class LinearSchedule(BaseSchedule):
    """λ linear in t: λ = t·(lo − hi) + hi over ``logsnr_range``."""

    def __init__(self, logsnr_range: Sequence[float] = (-10, 10), **base_kwargs):
        self.logsnr_range = list(pair("logsnr_range", logsnr_range))
        super().__init__(**base_kwargs)

    def schedule(self, t, batch_size, generator=None):
        if t is None:
            t = self._random_t(batch_size, generator)
        lo, hi = self.logsnr_range
        return t * (lo - hi) + hi

class InterpolatedSchedule(BaseSchedule):
    """λ = scheduler1(t, shifts[0])·t + scheduler2(t, shifts[1])·(1 − t), t clamped to [1e−7, 1−1e−7]."""

    def __init__(self, scheduler1: BaseSchedule, scheduler2: BaseSchedule,
                 shifts: Sequence[float] = (1.0, 1.0), **base_kwargs):
        for name, sched in (("scheduler1", scheduler1), ("scheduler2", scheduler2)):
            if not isinstance(sched, BaseSchedule):
                raise ValueError(f"{name} must be a BaseSchedule, got {type(sched).__name__}")
        self.scheduler1, self.scheduler2 = scheduler1, scheduler2
        self.shifts = [positive("shifts[0]", shifts[0]), positive("shifts[1]", shifts[1])]
        super().__init__(**base_kwargs)

    def schedule(self, t, batch_size, generator=None):
        if t is None:
            t = self._random_t(batch_size, generator)
        t = t.clamp(1e-7, 1 - 1e-7)
        low = self.scheduler1(t, shift=self.shifts[0])
        high = self.scheduler2(t, shift=self.shifts[1])
        return low * t + high * (1 - t)

