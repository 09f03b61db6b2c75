"""ControlNet at inference: filter the control image, run the ControlNet, scale its outputs.

The resulting list is used for BOTH CFG halves (docs/OFFICIAL.md, ControlNet training), each entry multiplied
by ``cnet_multiplier`` (the notebooks' knob).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from inference.errors import UserError


def build_filter(name: str, params: Optional[dict], device: torch.device,
                 effnet: Optional[torch.nn.Module] = None) -> Any:
    """``modules.filters.resolve_filter`` with the runtime objects a built-in filter needs."""
    from modules import filters

    params = dict(params or {})
    cls = filters.FILTERS.get(name)
    accepted = inspect.signature(cls).parameters if cls is not None else {}
    if "device" in accepted:
        params.setdefault("device", device)
    if "effnet" in accepted and effnet is not None:
        params.setdefault("effnet", effnet)
    try:
        return filters.resolve_filter(name, params)
    except (filters.FilterError, ImportError, OSError) as exc:
        raise UserError(f"controlnet_filter {name}: {exc}") from None


def needs_effnet(name: str) -> bool:
    """True for filters that encode the control image with the EfficientNet (super-resolution)."""
    from modules import filters

    cls = filters.FILTERS.get(name)
    return cls is not None and "effnet" in inspect.signature(cls).parameters


@torch.no_grad()
def control_list(cnet_filter: Any, controlnet: torch.nn.Module, images: torch.Tensor,
                 multiplier: float = 1.0, generator: Optional[torch.Generator] = None
                 ) -> tuple[list[Optional[torch.Tensor]], torch.Tensor]:
    """(ControlNet outputs times ``multiplier``, filter preview) for control images in [0,1]."""
    param = next(controlnet.parameters())
    try:
        out = cnet_filter(images.to(param.device), generator=generator)
    except ImportError as exc:
        raise UserError(f"ControlNet filter needs a missing dependency: {exc}") from None
    control, preview = out if isinstance(out, tuple) else (out, out)
    features = controlnet(control.to(param.device, param.dtype))
    return [None if f is None else f * multiplier for f in features], preview
