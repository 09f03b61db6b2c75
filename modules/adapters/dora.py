"""DoRA's weight decomposition, in our form and in the forms other tools write.

* ours (``dora_magnitude`` (out,), :func:`dora_weight`): ``m * V / ||V||_row`` with ``V = W + delta``,
  exact DoRA with the norm per output row (the DoRA paper, peft);
* ComfyUI's ``dora_scale`` (out, 1, ...): ComfyUI divides ``V`` by the BASE weight's row norm (+ eps)
  and multiplies by ``dora_scale`` (:func:`tool_decompose`; :func:`comfy_dora_scale` writes ours in it);
* OneTrainer's / LyCORIS' ``dora_scale`` (1, in, ...): ``dora_scale * V / ||V||_col``, the norm per
  INPUT column of the adapted weight (+ eps); a row-wise magnitude cannot be written in this form.
"""
from __future__ import annotations

import torch

from modules.adapters.errors import TINY, AdapterError

# ComfyUI patches weights in float32 and adds this to the norm it divides dora_scale by.
EPS = torch.finfo(torch.float32).eps


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """Float32 L2 norm of each output row of ``weight`` (over all dims but dim 0: a conv's input
    channels and kernel positions), shape (out,). The DoRA magnitude's unit."""
    return weight.float().flatten(1).norm(dim=1)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """Float32 L2 norm per input column (over output rows and kernel), shaped (1, in, 1, ...)."""
    w = weight.float()
    return w.transpose(0, 1).flatten(1).norm(dim=1).view((1, -1) + (1,) * (w.dim() - 2))


def dora_weight(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's weight ``m * V / ||V||_row`` with ``V = base + delta`` (float32, shape of ``base``).

    ``delta`` broadcasts over trailing kernel dims of a conv ``base``; ``magnitude`` is (out,).
    The one definition of our DoRA math: the trainable DoRA and merging a record both call it."""
    v = base.float() + delta.float().view(delta.shape + (1,) * (base.dim() - delta.dim()))
    # A zero row has no direction: keep it zero instead of 0/0 (never the case for trained weights).
    scale = magnitude.float() / row_norms(v).clamp_min(TINY)
    return v * scale.view((-1,) + (1,) * (base.dim() - 1))


def tool_decompose(base: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, what: str) -> torch.Tensor:
    """The DoRA weight of a ``dora_scale`` written by another tool (float32): ComfyUI's row form
    (dim 0 == out: ``V * s / (||W||_row + eps)``) or the column form of OneTrainer/LyCORIS
    (``(1, in, ...)``: ``V * s / (||V||_col + eps)``)."""
    calc = base.float() + delta.float()
    if dora_scale.shape[0] == calc.shape[0] and calc.shape[0] != 1:
        norm = row_norms(base).view((-1,) + (1,) * (calc.dim() - 1))
    else:
        norm = column_norms(calc)
    norm = norm + EPS
    scale = dora_scale.float().to(calc.device)
    try:
        ok = torch.broadcast_shapes(scale.shape, norm.shape) == norm.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise AdapterError(f"{what}: dora_scale has shape {tuple(scale.shape)}, which does not fit a weight of "
                           f"shape {tuple(calc.shape)} (expected {tuple(norm.shape)})")
    return calc * (scale / norm)


def comfy_dora_scale(magnitude: torch.Tensor, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The ComfyUI ``dora_scale`` (out, 1[, 1, 1]) that makes ComfyUI's loader produce exactly our
    DoRA weight ``m * V / ||V||_row`` from the base ``W``: ComfyUI divides by ``||W||_row + eps``,
    so we write ``m * (||W||_row + eps) / ||V||_row`` (the file then belongs to that base, as any
    DoRA magnitude does)."""
    v = base.float() + delta.float()
    scale = magnitude.float() * (row_norms(base) + EPS) / row_norms(v).clamp_min(TINY)
    return scale.view((-1,) + (1,) * (base.dim() - 1))
