"""Loss weightings by name (the ``loss_weighting`` key of the training configs), for the
ε-prediction MSE that the Stable Cascade GDFs train with.

The weight multiplies the per-sample ε-MSE; with λ = logSNR and SNR = exp(λ):

* ``p2``: 1 / (1 + SNR) (P2LossWeight, the official default);
* ``adaptive``: AdaptiveLossWeight (learns from the losses; the official ``adaptive_loss_weight``);
* ``min_snr``: min(SNR, γ) / SNR, i.e. min(1, γ / SNR) (Min-SNR-γ, Hang et al. 2023, written for
  an ε target: the x0-space weight min(SNR, γ) divided by SNR, the factor between x0 and ε MSE);
* ``debiased``: 1 / √SNR (DebiasedLossWeight, the "debiased estimation" weighting);
* ``sech``: 1 / cosh(λ / 2) (SechLossWeight);
* ``constant``: 1 (plain ε-MSE).
"""
from __future__ import annotations

from typing import Literal, Optional, get_args

from .adaptive_loss import AdaptiveLossWeight
from .loss_weights import (BaseLossWeight, ComposedLossWeight, ConstantLossWeight, DebiasedLossWeight,
                           MinSNRLossWeight, P2LossWeight, SechLossWeight, SNRLossWeight)

__all__ = ["LossWeighting", "LOSS_WEIGHTINGS", "DEFAULT_MIN_SNR_GAMMA", "check_loss_weighting", "make_loss_weight"]

#: the names ``make_loss_weight`` knows (a config key can be typed with it)
LossWeighting = Literal["p2", "adaptive", "min_snr", "debiased", "sech", "constant"]
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
#: γ of min_snr when none is given (the paper's and kohya's usual value)
DEFAULT_MIN_SNR_GAMMA = 5.0


def check_loss_weighting(name: Optional[str], min_snr_gamma: Optional[float] = None) -> None:
    """ValueError unless ``name`` (None: the caller's default weight) is one of ``LOSS_WEIGHTINGS``
    and ``min_snr_gamma`` is None or a γ > 0 given with ``min_snr``."""
    if name is not None and name not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {list(LOSS_WEIGHTINGS)}, got {name!r}")
    if min_snr_gamma is None:
        return
    if name != "min_snr":
        raise ValueError(f"min_snr_gamma applies to the min_snr weighting only, not {name!r}: remove it or choose min_snr")
    if not float(min_snr_gamma) > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")


def make_loss_weight(name: str, min_snr_gamma: Optional[float] = None) -> BaseLossWeight | AdaptiveLossWeight:
    """The loss weight called ``name`` (one of ``LOSS_WEIGHTINGS``); ``min_snr_gamma`` only for ``min_snr``."""
    if name is None:
        raise ValueError(f"loss weighting must be one of {list(LOSS_WEIGHTINGS)}, got None")
    check_loss_weighting(name, min_snr_gamma)
    if name == "min_snr":
        gamma = DEFAULT_MIN_SNR_GAMMA if min_snr_gamma is None else float(min_snr_gamma)
        return ComposedLossWeight(div=SNRLossWeight(), mul=MinSNRLossWeight(max_snr=gamma))
    return {"p2": P2LossWeight, "adaptive": AdaptiveLossWeight, "debiased": DebiasedLossWeight,
            "sech": SechLossWeight, "constant": ConstantLossWeight}[name]()
