"""``SREffnetFilter``: the Stage C latent of a half-resolution copy (the official super-resolution
ControlNet's input)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from modules.effnet import imagenet_normalize
from modules.filters.common import check_call, check_scale_factor, DeviceLike, FilterError


class SREffnetFilter:
    """Super-resolution ControlNet input (16 channels): the Stage C latent of a downscaled image.

    ``x_small`` = nearest downscale by ``scale_factor``; ``e = effnet(ImageNet-normalised x_small)``;
    returns ``(nearest upsample of e by 1/scale_factor, nearest upsample of x_small to (H, W))`` —
    the first is the ControlNet input (for 0.5: the latent of the half-resolution image at the
    full-resolution latent size), the second the preview.

    Params:
        device: where the output lives.
        scale_factor: downscale factor in (0, 1] (official 0.5).
        effnet: the LOADED ``modules.effnet.EfficientNetEncoder`` (any module mapping normalised RGB
            to (B,16,h/32,w/32) works). The filter loads no file itself (the official one read a
            hard-coded path): the training script loads the encoder from ``effnet_checkpoint_path``
            and passes it here, or sets ``filter.effnet`` later. It is switched to eval mode (the
            encoder always runs with BN running statistics) and run in its own dtype/device.
    """

    def __init__(
        self, device: DeviceLike = "cpu", scale_factor: float = 0.5, effnet: Optional[torch.nn.Module] = None
    ) -> None:
        self.device = torch.device(device)
        self.scale_factor = check_scale_factor(scale_factor, "SREffnetFilter")
        if effnet is not None and not callable(effnet):
            raise FilterError(f"SREffnetFilter: effnet must be the loaded EfficientNetEncoder, got {type(effnet).__name__}")
        self.effnet = effnet

    def num_channels(self) -> int:
        return 16

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = check_call("SREffnetFilter", images, generator, kwargs).to(self.device)
        effnet = self.effnet
        if effnet is None:
            raise FilterError(
                "SREffnetFilter: no EfficientNet encoder; the training script must pass the loaded "
                "encoder (modules.effnet.EfficientNetEncoder with effnet_checkpoint_path loaded) as "
                "SREffnetFilter(..., effnet=encoder) or set filter.effnet = encoder"
            )
        if isinstance(effnet, torch.nn.Module) and effnet.training:
            effnet.eval()
        h, w = images.shape[-2:]
        small = F.interpolate(images, scale_factor=self.scale_factor, mode="nearest")
        inp = imagenet_normalize(small)
        param = next(iter(effnet.parameters()), None) if isinstance(effnet, torch.nn.Module) else None
        if param is not None:
            inp = inp.to(device=param.device, dtype=param.dtype)
        latent = effnet(inp)
        if not isinstance(latent, torch.Tensor) or latent.dim() != 4:
            raise FilterError("SREffnetFilter: effnet must return a (B,C,h,w) tensor")
        latent = F.interpolate(latent.float(), scale_factor=1.0 / self.scale_factor, mode="nearest")
        preview = F.interpolate(small, size=(h, w), mode="nearest")
        return latent.to(device=self.device, dtype=images.dtype), preview
