"""Which tensor of a weights dict holds a NaN or an infinity: the one check every loader of input
weights and every writer of weights calls (model loads, LoRA files, merges, exports, conversions,
caches).

Cheap: one fused norm kernel per device over all floating tensors (``torch._foreach_norm``, what
``clip_grad_norm_`` uses: about one read of the weights); only a tensor whose norm is not finite is
then looked at element-wise (a norm also overflows for large but finite values, e.g. 1e20, which
are not reported).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch

from fileio.errors import CheckpointError

__all__ = ["first_nonfinite_tensor", "check_finite"]


def first_nonfinite_tensor(weights: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating tensor of ``weights`` (in the dict's order) holding a NaN or
    an infinity; None when every one is finite. Other entries (integer tensors, non-tensors) are
    skipped."""
    floats = [(k, t.detach()) for k, t in weights.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not t.is_meta]
    suspects: set[str] = set()
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for k, t in floats:
        by_device.setdefault(t.device, []).append((k, t))
    for items in by_device.values():
        try:
            norms = torch.stack(torch._foreach_norm([t for _, t in items], 2, dtype=torch.float32))
        except (RuntimeError, TypeError):  # a dtype the fused kernel lacks (float8): element-wise
            suspects.update(k for k, _ in items)
            continue
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        suspects.update(items[i][0] for i in bad)
    for k, t in floats:
        if k in suspects and not bool(torch.isfinite(t).all()):
            return k
    return None


def check_finite(weights: Mapping[str, torch.Tensor], source: Union[str, os.PathLike], writing: bool = False) -> None:
    """CheckpointError naming ``source`` and the tensor when a floating tensor of ``weights`` holds a
    NaN or an infinity. Loaders call it once per input file, so a damaged input is named at load,
    not blamed on the learning rate at the first save; writers (``writing=True``) call it before
    anything is written."""
    name = first_nonfinite_tensor(weights)
    if name is None:
        return
    if writing:
        raise CheckpointError(f"{source}: not written: tensor '{name}' holds NaN or infinite values "
                              f"(a model with non-finite weights is never saved; check the inputs that made it)")
    raise CheckpointError(f"{source}: tensor '{name}' holds NaN or infinite values: this input weight file is "
                          f"damaged or was saved from a diverged run; replace it")
