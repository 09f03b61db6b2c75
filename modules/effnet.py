"""EfficientNetEncoder: the Stage C latent encoder (images -> 16 x H/32 x W/32), and its input scaling.

Backbone = torchvision ``efficientnet_v2_s().features`` built with ``weights=None`` (the released
``effnet_encoder.safetensors`` overwrites every tensor, so nothing is downloaded), plus a 1x1 conv +
non-affine BatchNorm ``mapper`` (docs/OFFICIAL.md, EfficientNet encoder and Previewer).
``backbone="demo"`` is a narrow EfficientNet of the same kind (Fused-MBConv then MBConv stages,
stride 32) that the CPU demo fits on its photographs (registry version ``effnet/demo``); it is not
an official network.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images: Tensor) -> Tensor:
    """Normalise RGB images in [0,1], (B,3,H,W), with the ImageNet mean/std the encoder expects."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images)
        raise ValueError(f"imagenet_normalize: images must be a (B,3,H,W) tensor, got {shape}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def efficientnet_v2_s_features() -> nn.Sequential:
    """torchvision's efficientnet_v2_s ``.features`` (stride 32, 1280 channels), randomly initialised."""
    from torchvision.models import efficientnet_v2_s

    return efficientnet_v2_s(weights=None).features


def efficientnet_demo_features() -> nn.Sequential:
    """A narrow EfficientNet ``.features`` (stride 32, 128 channels, 0.17M parameters) for the CPU
    demo: a 4x4 average pool first (the demo only ever decodes latents back to 8x their size, i.e.
    a quarter of the image size, so finer detail is never used), then Fused-MBConv and MBConv stages
    of stride 8 like efficientnet_v2_s's. Cheap enough to fit as an autoencoder on CPU in a minute."""
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    setting = [FusedMBConvConfig(1, 3, 1, 24, 24, 1), FusedMBConvConfig(4, 3, 2, 24, 48, 1),
               MBConvConfig(4, 3, 2, 48, 64, 2), MBConvConfig(4, 3, 1, 64, 96, 1)]
    features = EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0, last_channel=128).features
    return nn.Sequential(nn.AvgPool2d(4), *features)


#: backbone name -> (builder, output channels)
BACKBONES = {"efficientnet_v2_s": (efficientnet_v2_s_features, 1280), "demo": (efficientnet_demo_features, 128)}


class EfficientNetEncoder(nn.Module):
    """Images normalised with :func:`imagenet_normalize` -> Stage C latents (B, c_latent, ceil(H/32), ceil(W/32)).

    Always runs in eval mode: its BatchNorms must use the released running statistics and stochastic
    depth must be off, so ``train(True)`` is ignored (the encoder is never trained here). The output is
    used as the Stage C latent without further scaling.
    """

    def __init__(self, c_latent: int = 16, backbone: str = "efficientnet_v2_s"):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"EfficientNetEncoder: unknown backbone {backbone!r}; known: {sorted(BACKBONES)}")
        build, c_features = BACKBONES[backbone]
        self.backbone = build()
        self.mapper = nn.Sequential(
            nn.Conv2d(c_features, c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent, affine=False),
        )
        self.gradient_checkpointing = False
        self.eval()

    def train(self, mode: bool = True) -> "EfficientNetEncoder":
        # Frozen-statistics encoder: see the class docstring.
        return super().train(False)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each backbone stage in backward (only matters if gradients flow through it)."""
        self.gradient_checkpointing = bool(enabled)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"EfficientNetEncoder: expected normalised images (B,3,H,W), got {tuple(x.shape)}")
        for stage in self.backbone:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.mapper(x)
