"""Samplers: one denoising step from level λ to the next, less noisy level λ_prev."""
from __future__ import annotations

from typing import Sequence

import torch

from . import _rng

__all__ = ["SimpleSampler", "DDIMSampler", "DDPMSampler", "LCMSampler", "SAMPLER_CLASSES", "make_sampler"]


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # (B,) coefficients broadcast over the remaining dimensions of `like`
    return v.view(-1, *[1] * (like.dim() - 1)) if v.dim() == 1 else v


class SimpleSampler:
    """Base sampler: keeps the ``gdf`` object and a ``current_step`` counter (−1, +1 per call).

    ``init_x(shape)`` draws the initial noise with ``torch.randn(*shape)`` on the CPU (or from
    ``generator`` on its device); ``__call__`` forwards to ``step``.
    """

    def __init__(self, gdf):
        self.gdf = gdf
        self.current_step = -1

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """Advance ``current_step`` and run one ``step``."""
        self.current_step += 1
        return self.step(*args, **kwargs)

    def init_x(self, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise of ``shape`` (float32)."""
        _rng.check_generator(generator)
        return _rng.randn(tuple(shape), generator)

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, **kwargs) -> torch.Tensor:
        """Return the sample at ``logSNR_prev``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DDIMSampler(SimpleSampler):
    """DDIM with stochasticity ``eta`` (0: deterministic).

    σ = eta·√(b'²/b²)·√(1 − a²/a'²); x' = a'·x0 + √(b'² − σ²)·ε + σ·z. ``z`` = randn_like(x0) is
    drawn on EVERY step, even with eta = 0 (then multiplied by 0), so the RNG advances exactly as
    in the reference.
    """

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, eta: float = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDIM step (see the class docstring)."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        a, b = self.gdf.input_scaler(logSNR)
        a, b = _per_sample(a, x0), _per_sample(b, x0)
        a_prev, b_prev = self.gdf.input_scaler(logSNR_prev)
        a_prev, b_prev = _per_sample(a_prev, x0), _per_sample(b_prev, x0)
        sigma = eta * (b_prev ** 2 / b ** 2).sqrt() * (1 - a ** 2 / a_prev ** 2).sqrt() if eta > 0 else 0
        noise = _rng.randn_like(x0, generator)
        # clamp(min=0) only guards against rounding below zero (NaN); it changes no finite value
        noise_scale = (b_prev ** 2 - sigma ** 2).clamp(min=0).sqrt()
        return a_prev * x0 + noise_scale * epsilon + sigma * noise


class DDPMSampler(DDIMSampler):
    """Ancestral DDPM sampling: DDIM with eta = 1 by default (Stable Cascade's sampler)."""

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, eta: float = 1,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDPM step (DDIM with ``eta`` = 1)."""
        return super().step(x, x0, epsilon, logSNR, logSNR_prev, eta=eta, generator=generator)


class LCMSampler(SimpleSampler):
    """Consistency-model step: x' = a'·x0 + randn_like(ε)·b'."""

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, generator: torch.Generator | None = None) -> torch.Tensor:
        """One LCM step (see the class docstring)."""
        a_prev, b_prev = self.gdf.input_scaler(logSNR_prev)
        a_prev, b_prev = _per_sample(a_prev, x0), _per_sample(b_prev, x0)
        return a_prev * x0 + _rng.randn_like(epsilon, generator) * b_prev


#: Sampler names accepted by ``make_sampler`` / ``GDF.sample(sampler="ddpm")``.
SAMPLER_CLASSES = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "lcm": LCMSampler}


def make_sampler(name: str, gdf) -> SimpleSampler:
    """A sampler object by name ("ddpm", "ddim" or "lcm"); unknown names raise ``ValueError``."""
    cls = SAMPLER_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"sampler: unknown sampler {name!r}, expected one of {sorted(SAMPLER_CLASSES)}")
    return cls(gdf)
