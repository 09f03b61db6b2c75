"""Numeric precision of a run: autocast for the trained network, dtype of the frozen networks.

``precision: auto`` gives bf16 autocast on GPUs that support it and fp32 elsewhere; frozen
networks are stored in ``frozen_dtype`` (bf16 on capable GPUs by default: half their memory), and
their floating inputs are cast to match so callers keep passing float32 tensors.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from torch import nn

from core.errors import UserError

__all__ = ["resolve_autocast_dtype", "resolve_frozen_dtype", "autocast", "cast_frozen"]

log = logging.getLogger(__name__)


def resolve_autocast_dtype(precision: str, device: torch.device, allow_tf32: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype of the trained network's forward for ``precision`` on ``device``
    (None = no autocast). Also sets the TF32 switches on CUDA."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            log.warning("precision %s requested but running on %s: training in fp32", precision, device)
        return None
    torch.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
    torch.backends.cudnn.allow_tf32 = bool(allow_tf32)
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise UserError("precision 'bf16' requested but this GPU does not support bfloat16; use precision: fp32")
        log.warning("this GPU does not support bfloat16: training in fp32 (slow)")
        return None
    return torch.bfloat16


def resolve_frozen_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """``frozen_dtype`` by name, or bf16 on a bf16-capable GPU and float32 elsewhere (CPU: exact, fast)."""
    if name:
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store a frozen network in ``dtype``; its floating positional inputs are cast to match
    (callers pass float32 tensors and ``.float()`` the outputs)."""
    if all(p.dtype == dtype for p in module.parameters()) and getattr(module, "_frozen_cast", None) == dtype:
        return module
    module.to(dtype)
    if dtype == torch.float32:
        return module

    def cast_inputs(_mod: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    module.register_forward_pre_hook(cast_inputs)
    module._frozen_cast = dtype  # type: ignore[attr-defined]  # registering the hook once is enough
    return module
