"""Prediction targets: what the network predicts, and how to get x0 / ε back from a prediction."""
from __future__ import annotations

import torch

__all__ = ["EpsilonTarget", "X0Target", "VTarget", "RectifiedFlowsTarget"]

Tensor = torch.Tensor


class EpsilonTarget:
    """Predict the noise ε (Stable Cascade)."""

    def __call__(self, x0: Tensor, epsilon: Tensor, logSNR: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """The training target: ε."""
        return epsilon

    def x0(self, noised: Tensor, pred: Tensor, logSNR: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """x0 = (noised − pred·b)/a."""
        return (noised - pred * b) / a

    def epsilon(self, noised: Tensor, pred: Tensor, logSNR: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """ε = pred."""
        return pred


class X0Target:
    """Predict the clean sample x0."""

    def __call__(self, x0, epsilon, logSNR, a, b):
        """The training target: x0."""
        return x0

    def x0(self, noised, pred, logSNR, a, b):
        """x0 = pred."""
        return pred

    def epsilon(self, noised, pred, logSNR, a, b):
        """ε = (noised − pred·a)/b."""
        return (noised - pred * a) / b


class VTarget:
    """Predict v = a·ε − b·x0."""

    def __call__(self, x0, epsilon, logSNR, a, b):
        """The training target: a·ε − b·x0."""
        return a * epsilon - b * x0

    def x0(self, noised, pred, logSNR, a, b):
        """x0 = a/(a²+b²)·noised − b/(a²+b²)·pred."""
        squared_sum = a ** 2 + b ** 2
        return a / squared_sum * noised - b / squared_sum * pred

    def epsilon(self, noised, pred, logSNR, a, b):
        """ε = b/(a²+b²)·noised + a/(a²+b²)·pred."""
        squared_sum = a ** 2 + b ** 2
        return b / squared_sum * noised + a / squared_sum * pred


class RectifiedFlowsTarget:
    """Predict the velocity ε − x0 (meant for the LERP scaler, where a + b = 1)."""

    def __call__(self, x0, epsilon, logSNR, a, b):
        """The training target: ε − x0."""
        return epsilon - x0

    def x0(self, noised, pred, logSNR, a, b):
        """x0 = noised − pred·b."""
        return noised - pred * b

    def epsilon(self, noised, pred, logSNR, a, b):
        """ε = noised + pred·a."""
        return noised + pred * a
