"""``crop: smart``: the official SmartCrop (docs/OFFICIAL.md, Data), run in the data workers.

The crop window is centred on the salient part of the resized image: a *saliency function* (any
callable ``(1, 3, h, w) float in [0, 1] -> (1, 1, h', w')`` map; the training jobs hand in the
released saliency network) is run on a copy resized so its shorter side is 240 px (bilinear with
antialias, torchvision's resize rule); then

* ``tempered = softmax(S / temperature)`` over all map pixels (temperature 0.03), and the binary map
  ``M = tempered > 0.75 * max(tempered)`` (the top-25 % of the tempered saliency);
* centroid ``(cy, cx) = sum(M * coord) / sum(M)`` with ``coord`` = ``linspace(0, 1)`` over the map's
  rows and columns;
* with probability ``randomize_p`` (0.3) the centroid moves by ``U(-randomize_q, randomize_q)``
  (0.2) in each direction;
* ``top = int(clamp(cy * H - h / 2, 0, max(0, H - h)))``, ``left`` likewise; if the window is
  smaller than the target (an image smaller than the crop), a centre crop instead.

The random draws come from the sample's own generator (identity-keyed, ``worker.py``), always
three of them (coin, dy, dx) whether or not the jitter applies, so a resumed run crops exactly as
the uninterrupted one did.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

#: Official SmartCrop settings of the training transform (torchtools ``SmartCrop``).
TEMPERATURE = 0.03
RANDOMIZE_P = 0.3
RANDOMIZE_Q = 0.2
#: Shorter side of the copy the saliency function sees.
SALIENCY_SIDE = 240

SaliencyFn = Callable[[torch.Tensor], torch.Tensor]


def resize_shorter(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) float -> shorter side ``side`` (longer ``int(side * long / short)``, the
    torchvision rule), bilinear with antialias."""
    h, w = x.shape[-2:]
    if h <= w:
        size = (side, int(side * w / h))
    else:
        size = (int(side * h / w), side)
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def saliency_centroid(saliency: torch.Tensor, temperature: float = TEMPERATURE) -> tuple[float, float]:
    """(cy, cx) in [0, 1] of the top-25 % tempered saliency of one map (h', w') (or (1, 1, h', w'))."""
    s = saliency.detach().float().reshape(saliency.shape[-2], saliency.shape[-1])
    tempered = torch.softmax(s.flatten() / temperature, dim=0)
    mask = (tempered > tempered.max() * 0.75).float().view_as(s)
    ys = torch.linspace(0, 1, s.shape[0]).view(-1, 1)
    xs = torch.linspace(0, 1, s.shape[1]).view(1, -1)
    total = mask.sum()
    return float((mask * ys).sum() / total), float((mask * xs).sum() / total)


def crop_offsets(centroid: tuple[float, float], image_hw: tuple[int, int], out_hw: tuple[int, int],
                 rng: np.random.Generator, randomize_p: float = RANDOMIZE_P,
                 randomize_q: float = RANDOMIZE_Q) -> tuple[int, int]:
    """(top, left) of the ``out_hw`` window around ``centroid`` in an ``image_hw`` image, with the
    jitter drawn from ``rng`` (three draws, always)."""
    cy, cx = centroid
    coin, dy, dx = rng.random(), rng.uniform(-randomize_q, randomize_q), rng.uniform(-randomize_q, randomize_q)
    if coin < randomize_p:
        cy, cx = cy + dy, cx + dx
    (H, W), (h, w) = image_hw, out_hw
    # float32 like the official tensor arithmetic, then truncation towards zero (``.int()``)
    top = int(np.float32(min(max(np.float32(cy) * H - h / 2, 0.0), max(0, H - h))))
    left = int(np.float32(min(max(np.float32(cx) * W - w / 2, 0.0), max(0, W - w))))
    return top, left


def smart_crop(image: np.ndarray, out_hw: tuple[int, int], saliency: SaliencyFn,
               rng: np.random.Generator) -> np.ndarray:
    """SmartCrop of a uint8 (3, H, W) image (already resized to cover ``out_hw``) -> (3, h, w)."""
    if saliency is None:
        raise ValueError("crop: smart needs a saliency function")
    H, W = image.shape[-2:]
    h, w = out_hw
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)[None]
        s = _call(saliency, resize_shorter(x, SALIENCY_SIDE))
    top, left = crop_offsets(saliency_centroid(s), (H, W), (h, w), rng)
    crop = image[:, top:top + h, left:left + w]
    if crop.shape[-2] < h or crop.shape[-1] < w:  # an image smaller than the window: centre crop
        top, left = max(0, (H - h) // 2), max(0, (W - w) // 2)
        crop = image[:, top:top + h, left:left + w]
    return crop


def _call(saliency: Any, x: torch.Tensor) -> torch.Tensor:
    param = next(iter(getattr(saliency, "parameters", lambda: iter(()))()), None)
    if param is not None:  # a module: its device and dtype
        x = x.to(param.device, param.dtype)
    out = saliency(x)
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.numel() == 0:
        raise ValueError(f"the saliency function returned {type(out).__name__}, not a (1, 1, h, w) map")
    return out.float().cpu()
