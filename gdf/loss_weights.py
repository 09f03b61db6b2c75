"""Loss weights: logSNR λ → per-sample weight of the diffusion loss."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._checks import pair, positive

__all__ = [
    "BaseLossWeight",
    "ComposedLossWeight",
    "ConstantLossWeight",
    "SNRLossWeight",
    "P2LossWeight",
    "SNRPlusOneLossWeight",
    "MinSNRLossWeight",
    "MinSNRPlusOneLossWeight",
    "TruncatedSNRLossWeight",
    "SechLossWeight",
    "DebiasedLossWeight",
    "SigmoidLossWeight",
]


class BaseLossWeight:
    """``__call__(λ, shift=1, clamp_range=None)`` = clamp(weight(λ + 2·log(shift)), clamp_range).

    Note the sign: a loss shift ADDS 2·log(shift), the opposite of the schedule's shift.
    """

    def weight(self, logSNR: torch.Tensor) -> torch.Tensor:
        """The unclamped weight for ``logSNR``."""
        raise NotImplementedError

    def __call__(self, logSNR: torch.Tensor, *args, shift: float = 1,
                 clamp_range: Sequence[float] | None = None, **kwargs) -> torch.Tensor:
        """The weight for ``logSNR`` (shifted by ``shift``, clamped to ``clamp_range`` or ±1e9)."""
        positive("shift", shift)
        clamp_range = [-1e9, 1e9] if clamp_range is None else list(pair("clamp_range", clamp_range))
        if shift != 1:
            logSNR = logSNR + 2 * float(np.log(shift))  # a copy: the caller's λ is untouched
        return self.weight(logSNR, *args, **kwargs).clamp(*clamp_range)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ComposedLossWeight(BaseLossWeight):
    """Π mul_i.weight(λ) / Π div_j.weight(λ) (argument order: ``div`` first, as the reference)."""

    def __init__(self, div: BaseLossWeight | Sequence[BaseLossWeight], mul: BaseLossWeight | Sequence[BaseLossWeight]):
        self.div = [div] if isinstance(div, BaseLossWeight) else list(div)
        self.mul = [mul] if isinstance(mul, BaseLossWeight) else list(mul)
        for name, items in (("div", self.div), ("mul", self.mul)):
            if not all(isinstance(w, BaseLossWeight) for w in items):
                raise ValueError(f"{name} must be a BaseLossWeight or a list of them")

    def weight(self, logSNR):
        prod, div = 1, 1
        for m in self.mul:
            prod = prod * m.weight(logSNR)
        for d in self.div:
            div = div * d.weight(logSNR)
        return prod / div


class ConstantLossWeight(BaseLossWeight):
    """A constant ``v`` for every sample."""

    def __init__(self, v: float = 1):
        self.v = float(v)

    def weight(self, logSNR):
        return torch.ones_like(logSNR) * self.v


class SNRLossWeight(BaseLossWeight):
    """SNR = exp(λ)."""

    def weight(self, logSNR):
        return logSNR.exp()


class P2LossWeight(BaseLossWeight):
    """(k + exp(λ·s))^(−gamma); the defaults give 1/(1 + SNR) = b² of the VP scaler."""

    def __init__(self, k: float = 1.0, gamma: float = 1.0, s: float = 1.0):
        self.k, self.gamma, self.s = float(k), float(gamma), float(s)

    def weight(self, logSNR):
        return (self.k + (logSNR * self.s).exp()) ** -self.gamma


class SNRPlusOneLossWeight(BaseLossWeight):
    """exp(λ) + 1."""

    def weight(self, logSNR):
        return logSNR.exp() + 1


class MinSNRLossWeight(BaseLossWeight):
    """min(exp(λ), max_snr)."""

    def __init__(self, max_snr: float = 5):
        self.max_snr = float(max_snr)

    def weight(self, logSNR):
        return logSNR.exp().clamp(max=self.max_snr)


class MinSNRPlusOneLossWeight(BaseLossWeight):
    """min(exp(λ) + 1, max_snr)."""

    def __init__(self, max_snr: float = 5):
        self.max_snr = float(max_snr)

    def weight(self, logSNR):
        return (logSNR.exp() + 1).clamp(max=self.max_snr)


class TruncatedSNRLossWeight(BaseLossWeight):
    """max(exp(λ), min_snr)."""

    def __init__(self, min_snr: float = 1):
        self.min_snr = float(min_snr)

    def weight(self, logSNR):
        return logSNR.exp().clamp(min=self.min_snr)


class SechLossWeight(BaseLossWeight):
    """1/cosh(λ/div)."""

    def __init__(self, div: float = 2):
        self.div = positive("div", div)

    def weight(self, logSNR):
        return 1 / (logSNR / self.div).cosh()


class DebiasedLossWeight(BaseLossWeight):
    """1/√SNR = 1/√exp(λ)."""

    def weight(self, logSNR):
        return 1 / logSNR.exp().sqrt()


class SigmoidLossWeight(BaseLossWeight):
    """sigmoid(λ·s)."""

    def __init__(self, s: float = 1):
        self.s = float(s)

    def weight(self, logSNR):
        return (logSNR * self.s).sigmoid()
