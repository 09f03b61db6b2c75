"""Loading the networks an inference config names, and keeping them on the right device.

Missing checkpoints are a clear error (never random weights). On a GPU with bf16 support the
generators, ControlNet and CLIP run in the config's dtype (bf16 in the official configs); Stage A,
the EfficientNet encoder and the Previewer always stay float32 (as in the original). On the CPU
everything is float32, since bf16 matmuls there are slow and the original never ran them.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from inference.config import InferenceConfig
from inference.errors import UserError

DeviceLike = Union[str, torch.device, None]


def pick_device(device: DeviceLike = None) -> torch.device:
    """``None`` -> the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but no CUDA GPU is available; use --device cpu")
    return device


def weights_dtype(cfg: Optional[InferenceConfig], device: torch.device) -> torch.dtype:
    """bf16 only where asked for AND supported (CUDA with bf16); float32 otherwise."""
    wants_bf16 = cfg is not None and cfg.dtype == "bfloat16"
    if wants_bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def require_file(cfg: InferenceConfig, key: str, why: str) -> str:
    """The path under ``key``; a UserError when unset or missing (nothing is ever random-init).
    ``generator_checkpoint_path`` may also be a diffusers model folder (modules/diffusers_format.py)."""
    path = getattr(cfg, key)
    if not path:
        raise UserError(f"config key '{key}' is not set; it is needed for {why}")
    if not os.path.isfile(path) and not (key == "generator_checkpoint_path" and os.path.isdir(path)):
        from fileio.state_dicts import download_hint

        raise UserError(f"{key}: checkpoint file not found: {path} ({download_hint(path)}; relative paths "
                        f"resolve against --root)")
    return path


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def load_generator(cfg: InferenceConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Stage C or Stage B generator of ``cfg`` with its weights, frozen, in eval mode."""
    from modules.loading import load_model

    kind = "stage_c" if cfg.stage == "c" else "stage_b"
    path = require_file(cfg, "generator_checkpoint_path", f"the Stage {cfg.stage.upper()} generator")
    return quantize_base(cfg, _frozen(load_model(kind, cfg.model_version, path, dtype=dtype, device=device)))


def quantize_base(cfg: InferenceConfig, model: nn.Module) -> nn.Module:
    """``base_dtype``: the big weights of ``model`` stored in 8 bits (modules/quantize.py)."""
    if cfg.base_dtype:
        from modules.quantize import quantize_frozen_

        quantize_frozen_(model, cfg.base_dtype)
    return model


def load_aux(kind: str, cfg: InferenceConfig, key: str, device: torch.device) -> nn.Module:
    """Stage A / EfficientNet encoder / Previewer (float32, frozen)."""
    from modules.loading import load_model

    path = require_file(cfg, key, {"stage_a": "Stage A decoding", "effnet": "encoding images",
                                   "previewer": "Stage C previews"}[kind])
    return _frozen(load_model(kind, "default", path, dtype=torch.float32, device=device))


def load_controlnet(cfg: InferenceConfig, c_in: int, c_proj: int, dtype: torch.dtype,
                    device: torch.device) -> nn.Module:
    """The configured ControlNet, built on meta and filled from its checkpoint (strict)."""
    from modules.controlnet import ControlNet
    from fileio.errors import CheckpointError
    from fileio.state_dicts import read_state_dict
    from modules.loading import load_state_dict_strict

    path = require_file(cfg, "controlnet_checkpoint_path", "the ControlNet")
    try:
        with torch.device("meta"):
            net = ControlNet(c_in=c_in, c_proj=c_proj, proj_blocks=list(cfg.controlnet_blocks),
                             bottleneck_mode=cfg.controlnet_bottleneck_mode)
    except ValueError as exc:
        raise UserError(f"controlnet config: {exc}") from None
    hint = (f"for ControlNet(c_in={c_in}, bottleneck={cfg.controlnet_bottleneck_mode or 'effnet'}, "
            f"blocks={len(cfg.controlnet_blocks)}) (check controlnet_filter / controlnet_blocks / "
            f"controlnet_bottleneck_mode)")
    try:
        load_state_dict_strict(net, read_state_dict(path), path, hint=hint, dtype=dtype, device=device, assign=True)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    return _frozen(net)


def load_clip(name: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(tokenizer, frozen CLIP text model) from an HF name or a local folder."""
    from modules.conditioning import load_clip_text, load_tokenizer

    try:
        return load_tokenizer(name), load_clip_text(name, dtype=dtype, device=device)
    except OSError as exc:
        raise UserError(f"clip_text_model_name: {exc}") from None


def load_clip_image(name: str, dtype: torch.dtype, device: torch.device) -> Any:
    """Frozen CLIP vision model (image variation)."""
    from modules.conditioning import load_clip_vision

    try:
        return load_clip_vision(name, dtype=dtype, device=device)
    except OSError as exc:
        raise UserError(f"clip_image_model_name: {exc}") from None


class Placement:
    """Where models live. With ``offload`` each model waits on the CPU and visits the GPU only
    while its stage runs, so a 1024x1024 cascade fits a consumer GPU."""

    def __init__(self, device: torch.device, offload: bool = False) -> None:
        self.device = device
        self.offload = bool(offload) and device.type != "cpu"

    @property
    def home(self) -> torch.device:
        """Where models are loaded and parked."""
        return torch.device("cpu") if self.offload else self.device

    @contextlib.contextmanager
    def use(self, *models: Any) -> Iterator[None]:
        """Run a stage: its models on the device for the duration of the block."""
        present = [m for m in models if m is not None]
        if self.offload:
            for model in present:
                model.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                for model in present:
                    model.to("cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
