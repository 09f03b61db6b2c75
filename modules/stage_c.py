"""StageC: the text-conditional prior in the EfficientNet latent space (docs/OFFICIAL.md, Stage C)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from modules.common import (
    CascadeUNet,
    CnetDeliverer,
    LayerNorm2d,
    UpDownBlock2d,
)


class StageC(CascadeUNet):
    """Stage C prior; ``StageC()`` is the official 3.6B model.

    forward(x, r, clip_text, clip_text_pooled, clip_img, cnet=None, **t_conds) -> (B, c_out, h, w).
    ``cnet`` is the ControlNet output list; entry k is added before the k-th ResBlock call.
    """

    def __init__(
        self,
        c_in: int = 16,
        c_out: int = 16,
        c_r: int = 64,
        patch_size: int = 1,
        c_cond: int = 2048,
        c_hidden: Sequence[int] = (2048, 2048),
        nhead: Sequence[int] = (32, 32),
        blocks: Sequence[Sequence[int]] = ((8, 24), (24, 8)),
        block_repeat: Sequence[Sequence[int]] = ((1, 1), (1, 1)),
        level_config: Sequence[str] = ("CTA", "CTA"),
        c_clip_text: int = 1280,
        c_clip_text_pooled: int = 1280,
        c_clip_img: int = 768,
        c_clip_seq: int = 4,
        kernel_size: int = 3,
        dropout=(0.1, 0.1),
        self_attn=True,
        t_conds: Sequence[str] = ("sca", "crp"),
        switch_level: Sequence[bool] = (False,),
        gradient_checkpointing: "bool | int" = False,
    ):
        super().__init__()
        self.c_r = c_r
        self.c_cond = c_cond
        self.c_clip_seq = c_clip_seq
        self.t_conds = list(t_conds)
        self.blocks = [list(b) for b in blocks]
        c_hidden = list(c_hidden)
        if len(switch_level) < len(c_hidden) - 1:
            raise ValueError(f"switch_level needs {len(c_hidden) - 1} entries, got {list(switch_level)}")

        self.clip_txt_mapper = nn.Linear(c_clip_text, c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(c_clip_text_pooled, c_cond * c_clip_seq)
        self.clip_img_mapper = nn.Linear(c_clip_img, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)

        self.embedding = self._build_embedding(c_in, patch_size, c_hidden[0])

        def make_down(i: int) -> nn.Module:
            return nn.Sequential(
                LayerNorm2d(c_hidden[i - 1], elementwise_affine=False, eps=1e-6),
                UpDownBlock2d(c_hidden[i - 1], c_hidden[i], mode="down", enabled=switch_level[i - 1]),
            )

        def make_up(i: int) -> nn.Module:
            return nn.Sequential(
                LayerNorm2d(c_hidden[i], elementwise_affine=False, eps=1e-6),
                UpDownBlock2d(c_hidden[i], c_hidden[i - 1], mode="up", enabled=switch_level[i - 1]),
            )

        self._build_levels(c_hidden, c_cond, c_r, nhead, blocks, block_repeat, level_config, kernel_size,
                           dropout, self_attn, self.t_conds, make_down, make_up)

        self._finish_build(c_hidden[0], c_out, patch_size, gradient_checkpointing)

    def _init_weights(self) -> None:
        self.apply(self._xavier)
        for m in (self.clip_txt_mapper, self.clip_txt_pooled_mapper, self.clip_img_mapper):
            nn.init.normal_(m.weight, std=0.02)
        self._init_common(sum(self.blocks[0]))

    def gen_c_embeddings(self, clip_txt: torch.Tensor, clip_txt_pooled: torch.Tensor,
                         clip_img: torch.Tensor) -> torch.Tensor:
        """Conditioning sequence [text tokens, pooled tokens, image tokens] -> LayerNorm.

        Unlike the original, a 2-D pooled embedding (B, C) is accepted and treated as (B, 1, C).
        """
        if clip_txt.dim() != 3:
            raise ValueError(f"clip_text must be (B, N, C), got shape {tuple(clip_txt.shape)}")
        if clip_txt_pooled.dim() == 2:
            clip_txt_pooled = clip_txt_pooled.unsqueeze(1)
        if clip_img.dim() == 2:
            clip_img = clip_img.unsqueeze(1)
        for name, t in (("clip_text_pooled", clip_txt_pooled), ("clip_img", clip_img)):
            if t.dim() != 3:
                raise ValueError(f"{name} must be (B, S, C) or (B, C), got shape {tuple(t.shape)}")
        b = clip_txt.size(0)
        txt = self.clip_txt_mapper(clip_txt)
        pooled = self.clip_txt_pooled_mapper(clip_txt_pooled).view(b, clip_txt_pooled.size(1) * self.c_clip_seq, -1)
        img = self.clip_img_mapper(clip_img).view(b, clip_img.size(1) * self.c_clip_seq, -1)
        return self.clip_norm(torch.cat([txt, pooled, img], dim=1))

    def forward(self, x: torch.Tensor, r: torch.Tensor, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor,
                clip_img: torch.Tensor, cnet: Optional[Sequence[Optional[torch.Tensor]]] = None,
                **kwargs) -> torch.Tensor:
        x, dtype = self._working_dtype(x)
        r_embed = self._r_embed(r, dtype, kwargs)
        # Conditioning inputs follow the working dtype so a bf16 model runs without autocast too.
        clip = self.gen_c_embeddings(clip_text.to(dtype), clip_text_pooled.to(dtype), clip_img.to(dtype))
        x = self.embedding(x)
        deliverer = CnetDeliverer(cnet) if cnet is not None else None
        level_outputs = self._down_encode(x, r_embed, clip, deliverer)
        x = self._up_decode(level_outputs, r_embed, clip, deliverer)
        return self.clf(x)
