"""Input scalers: logSNR λ → (a, b) with noised = a·x0 + b·ε."""
from __future__ import annotations

import torch

__all__ = ["BaseScaler", "VPScaler", "LERPScaler"]


class BaseScaler:
    """Computes (a, b) = ``scalers(λ)``, optionally stretched so [min, max] maps onto [0, 1].

    ``stretched_limits`` = [min_a, max_a, min_b, max_b] is None until ``setup_limits`` is called.
    """

    def __init__(self):
        self.stretched_limits: list[float] | None = None

    def setup_limits(self, schedule, input_scaler: "BaseScaler", stretch_max: bool = True,
                     stretch_min: bool = True, shift: float = 1) -> list[float]:
        """Store [min_a, max_a, min_b, max_b] taken from λ(t=1) and λ(t=0) of ``schedule``."""
        min_logSNR = schedule(torch.ones(1), shift=shift)
        max_logSNR = schedule(torch.zeros(1), shift=shift)
        min_a, max_b = [v.item() for v in input_scaler(min_logSNR)] if stretch_max else [0, 1]
        max_a, min_b = [v.item() for v in input_scaler(max_logSNR)] if stretch_min else [1, 0]
        self.stretched_limits = [min_a, max_a, min_b, max_b]
        return self.stretched_limits

    def scalers(self, logSNR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the raw (a, b) for ``logSNR``."""
        raise NotImplementedError

    def __call__(self, logSNR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) for ``logSNR`` (stretched when ``stretched_limits`` is set)."""
        a, b = self.scalers(logSNR)
        if self.stretched_limits is not None:
            min_a, max_a, min_b, max_b = self.stretched_limits
            a = (a - min_a) / (max_a - min_a)
            b = (b - min_b) / (max_b - min_b)
        return a, b

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VPScaler(BaseScaler):
    """Variance preserving (Stable Cascade): a = √sigmoid(λ), b = √(1 − sigmoid(λ)), so a² + b² = 1."""

    def scalers(self, logSNR):
        a_squared = logSNR.sigmoid()
        a = a_squared.sqrt()
        b = (1 - a_squared).sqrt()
        return a, b


class LERPScaler(BaseScaler):
    """Linear interpolation (rectified flows): b = 1 − a with a²/(1 − a)² = exp(λ)."""

    def scalers(self, logSNR):
        u = logSNR.exp() - 1
        u[u == 0] = 1e-3  # λ = 0 would divide by zero; the reference nudges it in place
        a = 1 + (2 - (2 ** 2 + 4 * u) ** 0.5) / (2 * u)
        b = 1 - a
        return a, b
