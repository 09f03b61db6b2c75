"""Masked loss: train only where a per-sample mask says (a subject on a cluttered background).

The masks come with the images from the data layer (``core.data.build_pipeline(..., masks=...)``:
a ``KEY.mask.png`` member / ``name.mask.png`` file, else the image's alpha channel; cropped and
bucketed with the image; 255 = train here). Here a mask m (B, 1, H, W) in [0, 1] becomes the
weight of each latent pixel: the area average of m over the pixels the latent pixel covers
(``latent_mask``), then ``w = m + unmasked_weight * (1 - m)``. A sample's loss is the weighted mean
of its squared errors, ``sum(w * err) / (C * sum(w))`` over channels and latent pixels: with a
binary mask and ``unmasked_weight: 0`` exactly the MSE over the masked latent pixels (a sample whose
weights are all 0 contributes 0). The GDF loss weight and the regularization weight multiply it as
before.

The held-out loss (``validation_webdataset_path``) stays unmasked: it measures the plain objective.
The Stage C encoder cache (``tools/cache_dataset.py`` with ``masked_loss: true``) stores each
sample's ``mask`` already at the latent grid (``mask`` (1, h/32, w/32)), so a cached run weighs alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from core.config import doc
from core.errors import UserError

__all__ = ["MaskedLossConfig", "latent_mask", "pixel_weights", "masked_mean", "MASK_KEY"]

#: batch key of the masks (image batches: uint8 -> float (B, 1, H, W); cached batches: the latent grid)
MASK_KEY = "masks"
#: tensor name of a cached sample's mask (latent grid)
CACHE_MASK = "mask"


@dataclass
class MaskedLossConfig:
    """Keys of the masked loss (Stage B / Stage C jobs)."""

    masked_loss: bool = doc(False, "Weigh the loss per pixel by each sample's mask: the image's KEY.mask.png (in a "
                                   "tar shard, or name.mask.png beside name.jpg in an image folder; grey level, white "
                                   "= train) or else its alpha channel; cropped and bucketed with the image and "
                                   "averaged down to the latent grid (train/masked_loss.py). Not with crop: smart.")
    unmasked_weight: float = doc(0.0, "Loss weight of the pixels outside the mask, in [0, 1] (0 = learn only the masked "
                                      "region; 1 = the plain loss).")
    masked_loss_missing: Literal["full", "error"] = doc(
        "full", "A sample without a mask file or alpha channel under masked_loss: full = trained at full weight, "
                "error = the run stops naming the sample.")

    def validate_masked_loss(self) -> None:
        if not 0.0 <= self.unmasked_weight <= 1.0:
            raise UserError(f"config key 'unmasked_weight' must be in [0, 1], got {self.unmasked_weight}")
        if not self.masked_loss:
            if self.unmasked_weight != 0.0 or self.masked_loss_missing != "full":
                raise UserError("config keys 'unmasked_weight' / 'masked_loss_missing' apply with masked_loss: true "
                                "only; set masked_loss: true or remove them")
            return
        if getattr(self, "crop", None) == "smart":
            raise UserError("config key 'masked_loss' does not combine with crop: smart (the mask must be cut like "
                            "the image); use crop: random or center")

    def mask_mode(self) -> Optional[str]:
        """The ``masks`` argument of ``build_pipeline``: None when masked_loss is off."""
        return self.masked_loss_missing if self.masked_loss else None


def latent_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) masks in [0, 1] -> (B, 1, h, w) area averages over each latent pixel's patch
    (identity when already at ``size``)."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=tuple(size), mode="area")


def pixel_weights(masks: torch.Tensor, size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """Per latent pixel loss weights ``m + unmasked_weight * (1 - m)`` (B, 1, h, w)."""
    m = latent_mask(masks, size)
    return m + float(unmasked_weight) * (1.0 - m)


def masked_mean(err: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted mean of ``err`` (B, C, h, w) with ``weights`` (B, 1, h, w): (B,)."""
    w = weights.to(err.device, err.dtype)
    total = (err * w).sum(dim=(1, 2, 3))
    norm = w.sum(dim=(1, 2, 3)) * err.shape[1]
    return total / norm.clamp_min(1e-12)
