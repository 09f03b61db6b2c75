"""Noise options of the Stage B / Stage C / ControlNet diffusion loss: offset noise, input
perturbation and the distribution of the training time t.

Per training sample, from the sample's own generator (so runs, resumes and rank layouts repeat):

* ``timestep_distribution: uniform`` is the official draw inside ``gdf.diffuse`` (t = 1 - U + 0.001,
  clamped to [0.001, 1]); ``logit_normal`` draws t = sigmoid(timestep_mean + timestep_std * n),
  n ~ N(0, 1), clamped the same way, BEFORE the diffusion's draws (more weight on middle noise levels,
  the SD3 choice);
* ``offset_noise`` (s): ``gdf.diffuse`` adds ``s * o`` to the noise, o ~ N(0, 1) per (sample,
  channel), so the noise has a random per-channel mean (darker/brighter images become learnable);
  the target is that noise (GDF's implementation, the ControlNet job's key);
* ``input_perturbation`` (g): the network input becomes ``a * x0 + b * (eps + g * xi)`` with a fresh
  xi ~ N(0, 1) drawn AFTER the diffusion's draws, while the target stays eps (Ning et al. 2023:
  the exposure-bias fix), i.e. ``noised + b * g * xi``.

Validation (held-out loss) uses none of them: it measures the official objective at fixed times.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from core.config import doc
from core.errors import UserError

__all__ = ["NoiseConfig", "NoiseOptions", "T_MIN"]

#: lowest training time of the official draw (and of the other distributions)
T_MIN = 0.001


@dataclass
class NoiseConfig:
    """Noise keys of the diffusion loss (Stage B, Stage C, LoRA and ControlNet jobs)."""

    offset_noise: Optional[float] = doc(
        None, "Offset-noise strength s in [0, 1): the noise gets s * N(0, 1) per sample and channel added (None = 0; "
              "the official ControlNet runs used 0.1 for inpainting and SR; 0.05-0.1 for LoRAs of very dark/bright "
              "images).")
    input_perturbation: float = doc(
        0.0, "Input perturbation g >= 0 (< 1): the network sees a * x0 + b * (eps + g * xi) while the target stays eps "
             "(exposure-bias fix; 0.1 is the paper's value). 0 = off.")
    timestep_distribution: Literal["uniform", "logit_normal"] = doc(
        "uniform", "Distribution of the training time t in [0.001, 1]: uniform (official) or logit_normal "
                   "(t = sigmoid(timestep_mean + timestep_std * N(0, 1)): more updates at middle noise levels).")
    timestep_mean: float = doc(0.0, "Mean of the normal before the sigmoid of timestep_distribution: logit_normal "
                                    "(> 0 favours noisier times).")
    timestep_std: float = doc(1.0, "Standard deviation of the normal of timestep_distribution: logit_normal (> 0).")

    def validate_noise(self) -> None:
        if self.offset_noise is not None and not 0.0 <= self.offset_noise < 1.0:
            raise UserError(f"config key 'offset_noise' must be in [0, 1), got {self.offset_noise}")
        if not 0.0 <= self.input_perturbation < 1.0:
            raise UserError(f"config key 'input_perturbation' must be in [0, 1), got {self.input_perturbation}")
        if not self.timestep_std > 0:
            raise UserError(f"config key 'timestep_std' must be > 0, got {self.timestep_std}")
        if self.timestep_distribution == "uniform" and (self.timestep_mean != 0.0 or self.timestep_std != 1.0):
            raise UserError("config keys 'timestep_mean' / 'timestep_std' apply to timestep_distribution: logit_normal "
                            "only; remove them or set timestep_distribution: logit_normal")


class NoiseOptions:
    """The training-time draws of :class:`NoiseConfig` (offset noise lives in the GDF: :meth:`apply_offset`)."""

    def __init__(self, cfg: Any) -> None:
        self.offset = float(getattr(cfg, "offset_noise", None) or 0.0)
        self.perturbation = float(getattr(cfg, "input_perturbation", 0.0))
        self.distribution = getattr(cfg, "timestep_distribution", "uniform")
        self.mean, self.std = float(getattr(cfg, "timestep_mean", 0.0)), float(getattr(cfg, "timestep_std", 1.0))

    def apply_offset(self, gdf: Any) -> None:
        """Set the GDF's offset-noise strength (``gdf.diffuse`` adds it)."""
        gdf.offset_noise = self.offset

    def draw_t(self, generator: torch.Generator, device: torch.device) -> Optional[torch.Tensor]:
        """One sample's t (shape (1,)), or None for the official draw inside ``gdf.diffuse``."""
        if self.distribution == "uniform":
            return None
        n = torch.randn(1, generator=generator, device=generator.device)
        return torch.sigmoid(self.mean + self.std * n).clamp(T_MIN, 1.0).to(device)

    def perturb(self, gdf: Any, noised: torch.Tensor, log_snr: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """One sample's network input with input perturbation (unchanged when it is off)."""
        if self.perturbation == 0.0:
            return noised
        xi = torch.randn(noised.shape, generator=generator, device=generator.device).to(noised.device, noised.dtype)
        _a, b = gdf.input_scaler(log_snr)
        return noised + b.view(-1, *[1] * (noised.dim() - 1)) * self.perturbation * xi
