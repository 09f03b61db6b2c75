"""Merging conditional and unconditional model inputs into one doubled batch for CFG."""
from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["zeros_like_inputs", "merge_cfg_inputs"]


def zeros_like_inputs(model_inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Default unconditional inputs: ``zeros_like`` of every (tensor) conditional input."""
    out = {}
    for key, value in model_inputs.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"unconditional_inputs is None, so every model input must be a tensor; "
                f"model_inputs[{key!r}] is a {type(value).__name__} (pass unconditional_inputs)"
            )
        out[key] = torch.zeros_like(value)
    return out


def _merge_value(key: str, cond: Any, uncond: Any) -> Any:
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise ValueError(f"unconditional_inputs[{key!r}] must be a tensor like model_inputs[{key!r}]")
        return torch.cat([cond, uncond], dim=0)
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError(
                f"unconditional_inputs[{key!r}] must be a list of the same length as model_inputs[{key!r}]"
            )
        # pairs that are not both tensors become None (e.g. skipped ControlNet levels)
        return [
            torch.cat([c, u], dim=0) if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor) else None
            for c, u in zip(cond, uncond)
        ]
    if isinstance(cond, dict):
        if not isinstance(uncond, Mapping):
            raise ValueError(f"unconditional_inputs[{key!r}] must be a dict like model_inputs[{key!r}]")
        return {k: torch.cat([v, uncond.get(k, torch.zeros_like(v))], dim=0) for k, v in cond.items()}
    return None  # the reference drops every other kind of value on CFG steps


def merge_cfg_inputs(model_inputs: Mapping[str, Any], unconditional_inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Merge into one dict with the conditional keys, conditional half first.

    Inputs are paired BY KEY (the reference pairs by dict position; for identical key order the
    result is the same). tensor → cat([c, u]); list → element-wise cat where both are tensors,
    else None; dict → per sub-key cat([c[k], u.get(k, zeros_like(c[k]))]); anything else → None.
    A key present on only one side is an error.
    """
    if not isinstance(unconditional_inputs, Mapping):
        raise ValueError(f"unconditional_inputs must be a dict, got {type(unconditional_inputs).__name__}")
    missing = [k for k in model_inputs if k not in unconditional_inputs]
    extra = [k for k in unconditional_inputs if k not in model_inputs]
    if missing or extra:
        raise ValueError(
            "unconditional_inputs must have the same keys as model_inputs: "
            f"missing {missing}, unexpected {extra}"
        )
    return {k: _merge_value(k, v, unconditional_inputs[k]) for k, v in model_inputs.items()}
