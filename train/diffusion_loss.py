"""The diffusion training loss of the Stage B / Stage C jobs (docs/OFFICIAL.md, Stage C step), as an object
handed to the loop (edm2 style).

Per sample, from its own generator: ``gdf.diffuse`` draws t and the noise; the loss is the MSE of
the prediction against the target per sample, times the GDF loss weight, averaged over the batch.
With an AdaptiveLossWeight the per-sample raw losses update its buckets, gathered over all ranks,
and only once the step proved finite (``defer``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from core.distributed import all_gather_cat

__all__ = ["DiffusionLoss", "has_buckets", "repeat_inputs"]


def has_buckets(loss_weight: Any) -> bool:
    """Whether a GDF loss weight learns from the losses (AdaptiveLossWeight)."""
    return hasattr(loss_weight, "update_buckets")


def repeat_inputs(inputs: dict[str, Any], n: int) -> dict[str, Any]:
    """One sample's model inputs (batch dim 1; tensors or lists of tensors) repeated ``n`` times
    along the batch, for its ``n`` validation timesteps."""
    def rep(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.repeat(n, *[1] * (v.dim() - 1))
        if isinstance(v, (list, tuple)):
            return type(v)(rep(x) for x in v)
        return v
    return {k: rep(v) for k, v in inputs.items()}


class DiffusionLoss:
    """``loss(model, x0, generators, epsilon=None, sample_weight=None, pixel_weight=None) -> (loss,
    per-sample raw losses)``; ``sample_weight`` (one number per sample, e.g. the regularization
    weight) multiplies each sample's weighted loss before the batch mean; ``pixel_weight`` (B, 1, h,
    w) makes each sample's MSE a weighted mean over the latent pixels (masked loss)."""

    def __init__(self, gdf: Any, defer: Callable[[Callable[[], None]], None],
                 autocast: Callable[[], contextlib.AbstractContextManager], noise: Any = None) -> None:
        # noise: train/noise_options.NoiseOptions (timestep distribution, input perturbation) or None
        self.gdf, self.defer, self.autocast, self.noise = gdf, defer, autocast, noise

    def __call__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                 generators: list[torch.Generator], epsilon: Optional[torch.Tensor] = None,
                 sample_weight: Optional[torch.Tensor] = None,
                 pixel_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        with torch.no_grad():
            for i, g in enumerate(generators):
                eps_i = None if epsilon is None else epsilon[i:i + 1]
                t_i = None if self.noise is None else self.noise.draw_t(g, x0.device)
                part = self.gdf.diffuse(x0[i:i + 1], shift=1, loss_shift=1, epsilon=eps_i, t=t_i, generator=g)
                if self.noise is not None:
                    part = (self.noise.perturb(self.gdf, part[0], part[3], g), *part[1:])
                parts.append(part)
            noised, _eps, target, log_snr, noise_cond, loss_weight = (torch.cat(t) for t in zip(*parts))
        with self.autocast():
            pred = model(noised, noise_cond)
        err = (pred.float() - target.float()).pow(2)
        if pixel_weight is None:
            per_sample = err.mean(dim=(1, 2, 3))
        else:  # masked loss (train/masked_loss.py): the weighted mean over the latent pixels
            from train.masked_loss import masked_mean

            per_sample = masked_mean(err, pixel_weight)
        weighted = per_sample * loss_weight.float().view(-1)
        if sample_weight is not None:
            weighted = weighted * sample_weight.to(weighted.device, torch.float32)
        loss = weighted.mean()
        if has_buckets(self.gdf.loss_weight):
            log_snr, raw = log_snr.detach(), per_sample.detach()
            self.defer(lambda: self.gdf.loss_weight.update_buckets(all_gather_cat(log_snr).float().cpu(),
                                                                   all_gather_cat(raw).float().cpu()))
        return loss, per_sample.detach()

    def at_timesteps(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                     t: torch.Tensor, generator: torch.Generator, epsilon: Optional[torch.Tensor] = None
                     ) -> dict[str, torch.Tensor]:
        """The validation losses of ONE sample ``x0`` (1, C, H, W) at every time of ``t`` (T,):
        ``{"loss": weighted (T,), "mse": (T,)}``, the noise drawn on the CPU from ``generator``
        (so every device and process draws the same). No adaptive-weight update, no autograd."""
        n = t.numel()
        x = x0.expand(n, *x0.shape[1:])
        with torch.no_grad():
            if epsilon is None:
                epsilon = torch.randn(x.shape, generator=generator).to(x.device)
            noised, _eps, target, _log_snr, noise_cond, weight = self.gdf.diffuse(
                x, epsilon=epsilon, t=t.to(x.device), shift=1, loss_shift=1, generator=generator)
            with self.autocast():
                pred = model(noised, noise_cond)
            mse = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        return {"loss": mse * weight.float().view(-1), "mse": mse}
