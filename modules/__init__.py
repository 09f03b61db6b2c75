"""Stable Cascade networks as pure ``nn.Module``s, their registry, weight loading and CLIP encoders.

Files themselves (``read_state_dict``, ``save_safetensors``, ``CheckpointError``) are :mod:`fileio`'s.

The public classes are imported lazily so that ``import modules`` stays cheap and a notebook can
``from modules import StageC`` without importing torchvision or transformers.
"""
from importlib import import_module
from typing import Any

_EXPORTS = {
    "StageC": "modules.stage_c",
    "StageB": "modules.stage_b",
    "StageA": "modules.stage_a",
    "EfficientNetEncoder": "modules.effnet",
    "Previewer": "modules.previewer",
    "ControlNet": "modules.controlnet",
    "LoRA": "modules.lora",
    "ReToken": "modules.lora",
    "apply_lora": "modules.lora",
    "apply_retoken": "modules.lora",
    "build_model": "modules.registry",
    "MODEL_CONFIGS": "modules.registry",
    "describe_model_version": "modules.registry",
    "load_model": "modules.loading",
    "load_state_dict_strict": "modules.loading",
    "detect_model_version": "modules.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'modules' has no attribute {name!r}")
