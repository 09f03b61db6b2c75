"""Fit the demo's EfficientNet-style encoder and Previewer together as an autoencoder.

The demo trains a Stage C from scratch on a handful of photographs; what it samples is only
visible through the Previewer. Random frozen parts cannot show a photo, so the demo fits the pair
(``effnet/demo`` -> 16 x H/32 x W/32 latents -> ``previewer/demo`` -> 8x the latent size) on its
own photographs, then standardises the latents (the encoder's final non-affine BatchNorm) and
folds the inverse scaling into the Previewer's first convolution, so the pair decodes exactly as
fitted while Stage C sees unit-variance latents, like the released encoder's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class FitResult:
    """What the fit measured: PSNR (dB) of the Previewer's reconstruction of the photos at preview
    size (8x the latent size), and the number of Adam steps."""

    psnr: float
    steps: int


def preview_targets(images: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """``images`` in [0,1] area-downsampled to the Previewer's output size (8x the latent)."""
    return F.interpolate(images, size=(8 * latent_hw[0], 8 * latent_hw[1]), mode="area")


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of images in [0,1]."""
    mse = F.mse_loss(a.clamp(0, 1), b.clamp(0, 1)).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _encode(effnet: nn.Module, images: Tensor) -> Tensor:
    from modules.effnet import imagenet_normalize

    return effnet(imagenet_normalize(images))


def fit_autoencoder(effnet: nn.Module, previewer: nn.Module, images: Tensor, steps: int, batch_size: int = 16,
                    lr: float = 3e-3, latent_noise: float = 0.1, seed: int = 0) -> FitResult:
    """Fit ``effnet`` + ``previewer`` (in place) to reconstruct ``images`` ((N,3,H,W) in [0,1]) at
    preview size, then standardise the latents and compensate in the Previewer.

    Both stay in eval mode (their BatchNorms act as fixed affine maps), so the frozen networks
    later behave exactly as fitted. ``latent_noise`` (relative to the latents' std) blurs the
    latents during the fit so that the Previewer also decodes the near-miss latents a young
    Stage C samples into pictures.
    """
    g = torch.Generator().manual_seed(seed)
    effnet.eval()
    previewer.eval()
    params = [p for p in (*effnet.parameters(), *previewer.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, steps))))
    with torch.no_grad():
        latent_hw = tuple(_encode(effnet, images[:1]).shape[-2:])
    targets = preview_targets(images, latent_hw)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=g)
        z = _encode(effnet, images[idx])
        if latent_noise:
            z = z + latent_noise * z.detach().std() * torch.randn(z.shape, generator=g)
        loss = F.mse_loss(previewer(z), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        z = torch.cat([_encode(effnet, images[i:i + 16]) for i in range(0, len(images), 16)])
        before = torch.cat([previewer(z[i:i + 16]) for i in range(0, len(z), 16)])
        standardise(effnet, previewer, z)
        z = torch.cat([_encode(effnet, images[i:i + 16]) for i in range(0, len(images), 16)])
        after = torch.cat([previewer(z[i:i + 16]) for i in range(0, len(z), 16)])
    # folding is exact up to float rounding; a larger gap means the layouts changed under us
    assert torch.allclose(before, after, atol=1e-3), float((before - after).abs().max())
    return FitResult(psnr=psnr(after, targets), steps=steps)


def standardise(effnet: nn.Module, previewer: nn.Module, latents: Tensor) -> None:
    """Set the encoder's final non-affine BatchNorm to the per-channel mean/std of ``latents`` (its
    current output) and fold the inverse into the Previewer's first 1x1 convolution."""
    bn = effnet.mapper[-1]
    conv = previewer.blocks[0]
    if not (isinstance(bn, nn.BatchNorm2d) and not bn.affine and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (1, 1)):
        raise ValueError("standardise: expects effnet.mapper[-1] a non-affine BatchNorm2d and "
                         "previewer.blocks[0] a 1x1 Conv2d")
    # the current output is (x - rm) / sqrt(rv + eps); undo that to get the mapper conv's output x
    rm_old, scale_old = bn.running_mean.clone(), torch.sqrt(bn.running_var + bn.eps)
    x = latents * scale_old.view(1, -1, 1, 1) + rm_old.view(1, -1, 1, 1)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-12)
    # x can be far smaller than BatchNorm's eps (a barely fitted encoder): scale the mapper conv so
    # that its output x / std has unit variance; the BatchNorm then only subtracts the mean
    effnet.mapper[0].weight.div_(std.view(-1, 1, 1, 1))
    bn.running_mean.copy_(mean / std)
    bn.running_var.fill_(1.0)
    # new latent z' = (x - mean) / (std * sqrt(1 + eps)), old latent z = (x - rm_old) / scale_old
    # => z = a * z' + b, folded into the Previewer's first (1x1) convolution
    a = std * (1 + bn.eps) ** 0.5 / scale_old
    b = (mean - rm_old) / scale_old
    w = conv.weight[:, :, 0, 0]
    conv.bias.add_(w @ b)
    conv.weight.mul_(a.view(1, -1, 1, 1))
