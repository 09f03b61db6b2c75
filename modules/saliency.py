"""MicroResNet: the official saliency network of the inpainting filter and of SmartCrop.

docs/OFFICIAL.md, Saliency network (layout: ``tests/data/saliency_model.json``): 35 float32 tensors,
111,233 parameters, no buffers. The released weights are
``modules/cnet_modules/inpainting/saliency_model.pt`` of the official repository (the same file as
torchtools' ``transforms/models/saliency_model_v9.pt``), a torch pickle of a plain state dict;
:func:`load_saliency_model` reads it with ``weights_only=True`` (or a converted ``.safetensors``
copy) and loads it strictly.

Input: RGB in [0, 1] (no normalisation), any size; output: a sigmoid map (B, 1, h, w) at 1/8 of
the input size (stride 16 down, then x2 nearest up).
"""
from __future__ import annotations

import os
from typing import Union

import torch
from torch import Tensor, nn

__all__ = ["MicroResNet", "SaliencyResBlock", "load_saliency_model", "SALIENCY_FILE"]

#: Where the configs expect the released weights (``saliency_model_path`` default; the download
#: script saves them here).
SALIENCY_FILE = "models/saliency_model.pt"


def _norm(c: int) -> nn.InstanceNorm2d:
    # eps 1e-5, no running statistics: the released state dict holds no buffers.
    return nn.InstanceNorm2d(c, affine=True)


class SaliencyResBlock(nn.Module):
    """``x + resblock(x)`` with two reflect-padded 3x3 convolutions (state-dict names ``resblock.N``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.resblock = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, kernel_size=3), _norm(c), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, kernel_size=3), _norm(c),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.resblock(x)


class MicroResNet(nn.Module):
    """The saliency CNN: ``segmentator(residual(downsampler(x)))`` (docs/OFFICIAL.md, Saliency network)."""

    def __init__(self) -> None:
        super().__init__()
        self.downsampler = nn.Sequential(
            nn.ReflectionPad2d(4), nn.Conv2d(3, 8, kernel_size=9, stride=4), _norm(8), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(8, 16, kernel_size=3, stride=2), _norm(16), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(16, 32, kernel_size=3, stride=2), _norm(32), nn.ReLU(),
        )
        self.residual = nn.Sequential(
            SaliencyResBlock(32),
            nn.Conv2d(32, 64, kernel_size=1, bias=False, groups=32),
            SaliencyResBlock(64),
        )
        self.segmentator = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(64, 16, kernel_size=3), _norm(16), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.ReflectionPad2d(4), nn.Conv2d(16, 1, kernel_size=9), nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> saliency (B, 1, H/8, W/8) in (0, 1)."""
        return self.segmentator(self.residual(self.downsampler(x)))


def load_saliency_model(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> MicroResNet:
    """The released saliency weights at ``path`` (``.pt`` read with ``weights_only=True``, or
    ``.safetensors``) loaded strictly into a :class:`MicroResNet`, in eval mode without gradients.

    Raises ``CheckpointError`` (one line naming the file) when the file is missing, unreadable or
    does not match the layout.
    """
    from fileio.state_dicts import read_state_dict
    from modules.loading import load_state_dict_strict

    model = MicroResNet()
    load_state_dict_strict(model, read_state_dict(path), str(path),
                           hint="(expected the MicroResNet saliency weights, docs/OFFICIAL.md)")
    return model.to(device).eval().requires_grad_(False)

