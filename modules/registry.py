"""Model registry: (kind, model_version) -> constructor kwargs, and building models from it.

Official versions reproduce the released checkpoints (docs/OFFICIAL.md, Stage C and Stage B). The ``tiny`` versions
are structurally complete CPU-sized models for tests and the demo:

* ``stage_c/tiny``: c_hidden [32, 32], c_cond 32, nhead [2, 2], blocks [[1, 2], [2, 1]] ('CTA' levels,
  self-attention, t_conds sca/crp), c_clip_text = c_clip_text_pooled = 32, c_clip_img = 24,
  c_in = c_out = 16 (the EfficientNet latent width), c_r 64; 175,888 parameters.
* ``stage_b/tiny``: c_hidden [8, 16, 32, 32], c_cond 32, nhead [-1, -1, 2, 2], blocks
  [[1, 1, 1, 1], [1, 1, 1, 1]], up repeats [3, 3, 2, 2] (like 3B), c_clip 32, c_effnet 16,
  c_in = c_out = 4; a 16x16 latent runs at 8/4/2/1 pixels per level; 137,912 parameters.
"""
from __future__ import annotations

import copy
import functools
from importlib import import_module
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

MODEL_CONFIGS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "stage_c": {
        "3.6B": {},
        "1B": {"c_cond": 1536, "c_hidden": [1536, 1536], "nhead": [24, 24], "blocks": [[4, 12], [12, 4]]},
        "tiny": {
            "c_cond": 32, "c_hidden": [32, 32], "nhead": [2, 2], "blocks": [[1, 2], [2, 1]],
            "c_clip_text": 32, "c_clip_text_pooled": 32, "c_clip_img": 24,
        },
    },
    "stage_b": {
        "3B": {
            "c_hidden": [320, 640, 1280, 1280], "nhead": [-1, -1, 20, 20],
            "blocks": [[2, 6, 28, 6], [6, 28, 6, 2]], "block_repeat": [[1, 1, 1, 1], [3, 3, 2, 2]],
        },
        "700M": {
            "c_hidden": [320, 576, 1152, 1152], "nhead": [-1, 9, 18, 18],
            "blocks": [[2, 4, 14, 4], [4, 14, 4, 2]], "block_repeat": [[1, 1, 1, 1], [2, 2, 2, 2]],
        },
        "tiny": {
            "c_cond": 32, "c_hidden": [8, 16, 32, 32], "nhead": [-1, -1, 2, 2],
            "blocks": [[1, 1, 1, 1], [1, 1, 1, 1]], "block_repeat": [[1, 1, 1, 1], [3, 3, 2, 2]],
            "c_clip": 32,
        },
    },
    "stage_a": {"default": {}},
    # "demo": the CPU demo's encoder / Previewer pair (demo.py fits them together as an autoencoder)
    "effnet": {"default": {}, "demo": {"backbone": "demo"}},
    "previewer": {"default": {}, "demo": {"c_hidden": 128}},
    # Official ControlNets (docs/OFFICIAL.md, ControlNet), all for Stage C 3.6B (c_proj 2048). For another Stage C
    # pass ``c_proj=<its c_hidden[0]>`` as an override.
    "controlnet": {
        "canny": {"c_in": 1, "c_proj": 2048, "proj_blocks": [0, 4, 8, 12, 51, 55, 59, 63]},
        "inpainting": {"c_in": 4, "c_proj": 2048, "proj_blocks": [0, 4, 8, 12, 51, 55, 59, 63]},
        "sr": {"c_in": 16, "c_proj": 2048, "proj_blocks": [0, 4, 8, 12, 51, 55, 59, 63],
               "bottleneck_mode": "large"},
        "identity": {"c_in": 512, "c_proj": 2048, "proj_blocks": list(range(64)),
                     "bottleneck_mode": "simple"},
    },
}

# Classes are resolved lazily so that importing the registry does not import torchvision.
MODEL_CLASSES: Dict[str, Tuple[str, str]] = {
    "stage_c": ("modules.stage_c", "StageC"),
    "stage_b": ("modules.stage_b", "StageB"),
    "stage_a": ("modules.stage_a", "StageA"),
    "effnet": ("modules.effnet", "EfficientNetEncoder"),
    "previewer": ("modules.previewer", "Previewer"),
    "controlnet": ("modules.controlnet", "ControlNet"),
}


def _check_kind(kind: str) -> None:
    if kind not in MODEL_CONFIGS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {sorted(MODEL_CONFIGS)}")


def model_config(kind: str, model_version: str, **overrides: Any) -> Dict[str, Any]:
    """Constructor kwargs of a registered version (a deep copy), with ``overrides`` applied."""
    _check_kind(kind)
    versions = MODEL_CONFIGS[kind]
    if model_version not in versions:
        raise ValueError(
            f"unknown model_version {model_version!r} for {kind}; known versions: {list(versions)}")
    cfg = copy.deepcopy(versions[model_version])
    cfg.update(overrides)
    return cfg


def model_class(kind: str) -> type:
    """The nn.Module class that implements ``kind``."""
    _check_kind(kind)
    module_name, cls_name = MODEL_CLASSES[kind]
    return getattr(import_module(module_name), cls_name)


def build_model(kind: str, model_version: str, device: Optional[torch.device | str] = None,
                dtype: Optional[torch.dtype] = None, **overrides: Any) -> nn.Module:
    """Build ``kind`` at ``model_version`` (``device='meta'`` gives a weightless layout model).

    Floating-point parameters/buffers are cast to ``dtype`` when given.
    """
    cls = model_class(kind)
    cfg = model_config(kind, model_version, **overrides)
    if device is None:
        model = cls(**cfg)
    else:
        with torch.device(device):
            model = cls(**cfg)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


@functools.lru_cache(maxsize=None)
def _version_shapes(kind: str, model_version: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    model = build_model(kind, model_version, device="meta")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def registered_shapes(kind: str, model_version: str) -> Dict[str, Tuple[int, ...]]:
    """State-dict key -> shape of a registered version (built once on meta, cached)."""
    return dict(_version_shapes(kind, model_version))


def describe_model_version(kind: str, state_dict_shapes: Mapping[str, Sequence[int]]) -> Optional[str]:
    """Guess which registered ``model_version`` of ``kind`` a state dict belongs to.

    Returns the exact match if there is one, else the version whose keys and shapes agree best
    (at least half of the file's keys present with the same shape), else None.
    """
    _check_kind(kind)
    shapes = {k: tuple(v) for k, v in state_dict_shapes.items()}
    best, best_score = None, 0.0
    for version in MODEL_CONFIGS[kind]:
        try:
            ref = registered_shapes(kind, version)
        except ImportError:  # the class of another kind may not exist yet in a partial checkout
            continue
        if ref == shapes:
            return version
        agree = sum(1 for k, s in shapes.items() if ref.get(k) == s)
        score = agree / max(len(shapes), len(ref), 1)
        if score > best_score:
            best, best_score = version, score
    return best if best_score >= 0.5 else None
