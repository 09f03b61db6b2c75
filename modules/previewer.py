"""Previewer: a small conv decoder from Stage C latents (16 ch) to a rough RGB image at 8x resolution.

Used only for training/inference previews (docs/OFFICIAL.md, EfficientNet encoder and Previewer).
Order inside each stage is conv -> GELU -> BatchNorm (BN in eval mode for the released weights); the
output is not clamped.
"""
from __future__ import annotations

from torch import Tensor, nn


class Previewer(nn.Module):
    """(B, c_in, h, w) Stage C latents -> (B, c_out, 8h, 8w) preview image (roughly in [0,1])."""

    def __init__(self, c_in: int = 16, c_hidden: int = 512, c_out: int = 3):
        super().__init__()
        if c_hidden % 4:
            raise ValueError(f"Previewer: c_hidden={c_hidden} must be divisible by 4")
        c2, c4 = c_hidden // 2, c_hidden // 4
        self.blocks = nn.Sequential(
            nn.Conv2d(c_in, c_hidden, kernel_size=1), nn.GELU(), nn.BatchNorm2d(c_hidden),
            nn.Conv2d(c_hidden, c_hidden, kernel_size=3, padding=1), nn.GELU(), nn.BatchNorm2d(c_hidden),
            nn.ConvTranspose2d(c_hidden, c2, kernel_size=2, stride=2), nn.GELU(), nn.BatchNorm2d(c2),
            nn.Conv2d(c2, c2, kernel_size=3, padding=1), nn.GELU(), nn.BatchNorm2d(c2),
            nn.ConvTranspose2d(c2, c4, kernel_size=2, stride=2), nn.GELU(), nn.BatchNorm2d(c4),
            nn.Conv2d(c4, c4, kernel_size=3, padding=1), nn.GELU(), nn.BatchNorm2d(c4),
            nn.ConvTranspose2d(c4, c4, kernel_size=2, stride=2), nn.GELU(), nn.BatchNorm2d(c4),
            nn.Conv2d(c4, c4, kernel_size=3, padding=1), nn.GELU(), nn.BatchNorm2d(c4),
            nn.Conv2d(c4, c_out, kernel_size=1),
        )
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Accepted for interface uniformity; the previewer is tiny and never trained here."""
        self.gradient_checkpointing = bool(enabled)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)
