"""``SRFilter``: a nearest down/up-scaled copy of the image (super-resolution degradation)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from modules.filters.common import check_call, check_scale_factor, DeviceLike, FilterError


class SRFilter:
    """Super-resolution degradation (3 channels): nearest downscale by ``scale_factor`` then nearest
    upscale back to (H, W).

    Params:
        scale_factor: downscale factor in (0, 1] (official 1/4).
        device: where the output lives.

    Returns ``(degraded (B,3,H,W), the same tensor as the preview)``.
    """

    def __init__(self, scale_factor: float = 0.25, device: DeviceLike = "cpu") -> None:
        self.scale_factor = check_scale_factor(scale_factor, "SRFilter")
        self.device = torch.device(device)

    def num_channels(self) -> int:
        return 3

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = check_call("SRFilter", images, generator, kwargs).to(self.device)
        h, w = images.shape[-2:]
        small = F.interpolate(images, scale_factor=self.scale_factor, mode="nearest")
        if min(small.shape[-2:]) < 1:
            raise FilterError(f"SRFilter: scale_factor {self.scale_factor} leaves nothing of a {h}x{w} image")
        out = F.interpolate(small, size=(h, w), mode="nearest")
        return out, out
