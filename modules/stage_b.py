"""StageB: the latent decoder from EfficientNet latents to Stage A latents (docs/OFFICIAL.md, Stage B)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from modules.common import CascadeUNet, LayerNorm2d, match_dtype, resize_ac


def _mapper(c_in: int, c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c * 4, kernel_size=1),
        nn.GELU(),
        nn.Conv2d(c * 4, c, kernel_size=1),
        LayerNorm2d(c, elementwise_affine=False, eps=1e-6),
    )


class StageB(CascadeUNet):
    """Stage B decoder; ``StageB()`` is the official 3B model (file ``stage_b``).

    forward(x, r, effnet, clip, pixels=None, **t_conds) -> (B, c_out, H, W).
    """

    def __init__(
        self,
        c_in: int = 4,
        c_out: int = 4,
        c_r: int = 64,
        patch_size: int = 2,
        c_cond: int = 1280,
        c_hidden: Sequence[int] = (320, 640, 1280, 1280),
        nhead: Sequence[int] = (-1, -1, 20, 20),
        blocks: Sequence[Sequence[int]] = ((2, 6, 28, 6), (6, 28, 6, 2)),
        block_repeat: Sequence[Sequence[int]] = ((1, 1, 1, 1), (3, 3, 2, 2)),
        level_config: Sequence[str] = ("CT", "CT", "CTA", "CTA"),
        c_clip: int = 1280,
        c_clip_seq: int = 4,
        c_effnet: int = 16,
        c_pixels: int = 3,
        kernel_size: int = 3,
        dropout=(0, 0, 0.1, 0.1),
        self_attn=True,
        t_conds: Sequence[str] = ("sca",),
        gradient_checkpointing: "bool | int" = False,
    ):
        super().__init__()
        self.c_r = c_r
        self.c_cond = c_cond
        self.c_clip_seq = c_clip_seq
        self.c_pixels = c_pixels
        self.t_conds = list(t_conds)
        self.blocks = [list(b) for b in blocks]
        c_hidden = list(c_hidden)

        self.effnet_mapper = _mapper(c_effnet, c_hidden[0])
        self.pixels_mapper = _mapper(c_pixels, c_hidden[0])
        self.clip_mapper = nn.Linear(c_clip, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)

        self.embedding = self._build_embedding(c_in, patch_size, c_hidden[0])

        def make_down(i: int) -> nn.Module:
            return nn.Sequential(
                LayerNorm2d(c_hidden[i - 1], elementwise_affine=False, eps=1e-6),
                nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2),
            )

        def make_up(i: int) -> nn.Module:
            return nn.Sequential(
                LayerNorm2d(c_hidden[i], elementwise_affine=False, eps=1e-6),
                nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2),
            )

        self._build_levels(c_hidden, c_cond, c_r, nhead, blocks, block_repeat, level_config, kernel_size,
                           dropout, self_attn, self.t_conds, make_down, make_up)

        self._finish_build(c_hidden[0], c_out, patch_size, gradient_checkpointing)

    def _init_weights(self) -> None:
        self.apply(self._xavier)
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        for m in (self.effnet_mapper, self.pixels_mapper):
            nn.init.normal_(m[0].weight, std=0.02)
            nn.init.normal_(m[2].weight, std=0.02)
        self._init_common(sum(self.blocks[0]))

    def gen_c_embeddings(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, S, c_clip) or (B, c_clip) pooled CLIP -> (B, S*c_clip_seq, c_cond), LayerNorm'ed."""
        if clip.dim() == 2:
            clip = clip.unsqueeze(1)
        if clip.dim() != 3:
            raise ValueError(f"clip must be (B, S, C) or (B, C), got shape {tuple(clip.shape)}")
        clip = self.clip_mapper(clip).view(clip.size(0), clip.size(1) * self.c_clip_seq, -1)
        return self.clip_norm(clip)

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor,
                pixels: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        x, dtype = self._working_dtype(x)
        if pixels is None:  # the default still contributes a learned bias map (checklist 7)
            pixels = x.new_zeros(x.size(0), self.c_pixels, 8, 8)
        r_embed = self._r_embed(r, dtype, kwargs)
        clip = self.gen_c_embeddings(clip.to(dtype))
        x = self.embedding(x)
        size = x.shape[-2:]
        # effnet: resize (float32) THEN map; pixels: map THEN resize (float32).
        x = x + self.effnet_mapper(match_dtype(resize_ac(effnet.float(), size), dtype))
        x = x + match_dtype(resize_ac(self.pixels_mapper(pixels.to(dtype)).float(), size), dtype)
        level_outputs = self._down_encode(x, r_embed, clip)
        x = self._up_decode(level_outputs, r_embed, clip)
        return self.clf(x)
