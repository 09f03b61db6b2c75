"""The Stage C condition dropout draws (docs/OFFICIAL.md, Stage C conditions), one implementation for every source of
conditions (the live CLIP encoders and the encoder cache).

Per sample, from its own generator and in this order: the caption is dropped (-> CLIP('')) iff
rand <= text_dropout, then the image embedding is used iff rand > 1 - image_embed_prob.
"""
from __future__ import annotations

import torch

__all__ = ["condition_dropout"]


def condition_dropout(generators: list[torch.Generator], text_dropout: float,
                      image_embed_prob: float) -> tuple[list[bool], list[bool]]:
    """``(drop_text, use_image_embedding)`` flags, one per generator/sample."""
    drop, use_img = [], []
    for g in generators:
        drop.append(torch.rand(1, generator=g).item() <= text_dropout)
        use_img.append(torch.rand(1, generator=g).item() > 1.0 - image_embed_prob)
    return drop, use_img
