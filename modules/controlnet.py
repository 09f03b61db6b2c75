"""ControlNet for Stage C: a control image -> a list of feature maps added before Stage C ResBlocks.

docs/OFFICIAL.md, ControlNet. The network encodes the (filtered) control input with one of three backbones and
projects the features once per entry of ``proj_blocks``; the output list is indexed by Stage C
ResBlock call number (down path then up path), ``None`` where no control is injected. Projections
end in a zero-initialised conv, so an untrained ControlNet injects zeros.

The filters that turn images into control inputs (Canny, inpainting masks, ...) live in
``modules/filters/`` (one file per filter).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.common import LayerNorm2d
from modules.effnet import efficientnet_v2_s_features

BOTTLENECK_MODES = ("effnet", "simple", "large")


class CNetResBlock(nn.Module):
    """Residual block of the 'large' backbone: (affine LN2d -> GELU -> 3x3 conv) x 2, plus identity."""

    def __init__(self, c: int):
        super().__init__()
        self.blocks = nn.Sequential(
            LayerNorm2d(c),  # PyTorch defaults (affine, eps 1e-5), unlike Stage B/C's LayerNorm2d
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.blocks(x)


def _effnet_backbone(c_in: int) -> nn.Sequential:
    """efficientnet_v2_s features, with the stem conv replaced when the control input is not RGB.

    The replacement stem has NO padding (the torchvision stem has padding=1). That is an upstream
    slip, but the released canny/inpainting weights were trained with it, so it is reproduced: e.g. a
    768x768 input gives a 383x383 stem output (instead of 384) and features shifted by half a pixel.
    The new stem is initialised from the existing stem (channels 0-2 copied, the rest zero, for
    c_in > 3; the first c_in channels for c_in < 3). Upstream copies from the ImageNet-pretrained stem;
    nothing is downloaded here, so this copies from a random stem -- with a released checkpoint the
    loaded weights overwrite it anyway, and only ControlNets trained from scratch see the difference.
    """
    backbone = efficientnet_v2_s_features()
    if c_in != 3:
        old = backbone[0][0].weight
        stem = nn.Conv2d(c_in, old.shape[0], kernel_size=3, stride=2, bias=False, device=old.device, dtype=old.dtype)
        if old.device.type != "meta":  # meta tensors carry no values; nothing to copy
            with torch.no_grad():
                if c_in > 3:
                    stem.weight.zero_()
                    stem.weight[:, :3] = old
                else:
                    stem.weight.copy_(old[:, :c_in])
        backbone[0][0] = stem
    return backbone


def _simple_backbone(c_in: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in * 4, kernel_size=3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(c_in * 4, c_in, kernel_size=3, padding=1),
    )


def _large_backbone(c_in: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, 4096 * 4, kernel_size=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4096 * 4, 1024, kernel_size=1),
        *[CNetResBlock(1024) for _ in range(8)],
        nn.Conv2d(1024, 1280, kernel_size=1),
    )


def _validate_proj_blocks(proj_blocks) -> list[int]:
    if proj_blocks is None:
        raise ValueError(
            "ControlNet: proj_blocks is required (the Stage C ResBlock call indices to inject into, "
            "e.g. [0, 4, 8, 12, 51, 55, 59, 63]; config key controlnet_blocks)"
        )
    blocks = list(proj_blocks)
    if not blocks:
        raise ValueError("ControlNet: proj_blocks is empty; give at least one Stage C ResBlock index")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ValueError(f"ControlNet: proj_blocks entries must be non-negative ints, got {b!r}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"ControlNet: proj_blocks has duplicate indices: {blocks}")
    return blocks


class ControlNet(nn.Module):
    """Control input (B, c_in, H, W) -> list of (B, c_proj, h, w) tensors or None, one per ResBlock call.

    Args:
        c_in: channels of the filtered control input (canny 1, inpainting 4, SR 16, identity 512).
        c_proj: Stage C ``c_hidden`` (2048 for 3.6B).
        proj_blocks: Stage C ResBlock call indices that receive a projection (required).
        bottleneck_mode: 'effnet' (default when None), 'simple' or 'large'.

    With the 'effnet' backbone the backbone stays in eval mode (BatchNorm running statistics, no
    stochastic depth) even while the ControlNet trains; its weights are still trainable.
    """

    def __init__(
        self,
        c_in: int = 3,
        c_proj: int = 2048,
        proj_blocks: Sequence[int] | None = None,
        bottleneck_mode: str | None = None,
    ):
        super().__init__()
        self.proj_blocks = _validate_proj_blocks(proj_blocks)
        if bottleneck_mode is None:
            bottleneck_mode = "effnet"
        if bottleneck_mode not in BOTTLENECK_MODES:
            raise ValueError(f"ControlNet: bottleneck_mode must be one of {BOTTLENECK_MODES} or None, got {bottleneck_mode!r}")
        if not isinstance(c_in, int) or c_in <= 0 or not isinstance(c_proj, int) or c_proj <= 0:
            raise ValueError(f"ControlNet: c_in ({c_in!r}) and c_proj ({c_proj!r}) must be positive ints")
        self.c_in = c_in
        self.bottleneck_mode = bottleneck_mode
        self.gradient_checkpointing = False

        if bottleneck_mode == "effnet":
            self.backbone, embd = _effnet_backbone(c_in), 1280
        elif bottleneck_mode == "simple":
            self.backbone, embd = _simple_backbone(c_in), c_in
        else:
            self.backbone, embd = _large_backbone(c_in), 1280

        self.projections = nn.ModuleList()
        for _ in self.proj_blocks:
            projection = nn.Sequential(
                nn.Conv2d(embd, embd, kernel_size=1, bias=False),
                nn.LeakyReLU(0.2),
                nn.Conv2d(embd, c_proj, kernel_size=1, bias=False),
            )
            nn.init.zeros_(projection[-1].weight)
            self.projections.append(projection)
        self.train()

    def train(self, mode: bool = True) -> "ControlNet":
        super().train(mode)
        if self.bottleneck_mode == "effnet":
            self.backbone.eval()  # see class docstring: BN statistics are frozen
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each top-level backbone block (and each projection) in backward."""
        self.gradient_checkpointing = bool(enabled)

    def _call(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward(self, x: Tensor) -> list[Tensor | None]:
        if x.ndim != 4 or x.shape[1] != self.c_in:
            raise ValueError(f"ControlNet: expected control input (B,{self.c_in},H,W), got {tuple(x.shape)}")
        for block in self.backbone:
            x = self._call(block, x)
        out: list[Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for index, projection in zip(self.proj_blocks, self.projections):
            out[index] = self._call(projection, x)
        return out


def __getattr__(name: str):
    # docs/ARCHITECTURE.md promises the filters under modules.controlnet (configs name them like the
    # original's `getattr(modules.controlnet, filter_name)`); they live in the modules/filters/ package
    # and are imported lazily so building a ControlNet does not pull in the filters' dependencies.
    if not name.startswith("_"):
        from modules import filters

        if name in getattr(filters, "__all__", ()):
            return getattr(filters, name)
    raise AttributeError(f"module 'modules.controlnet' has no attribute {name!r}")
