"""The jobs' side of the saliency network: which crop a config trains with, and loading the
network of ``saliency_model_path`` for ``crop: smart`` (data workers) and the InpaintFilter masks."""
from __future__ import annotations

import os
from typing import Any

import torch

from core.errors import UserError

#: how to get the file, or what to choose instead (the one-line error of a missing file)
GET_IT = ("get it with `bash models/download_models.sh saliency` (see models/README.md), or choose "
          "`crop: random` or `crop: center`")


def resolve_job_crop(cfg: Any) -> None:
    """``crop: auto`` -> ``smart`` for fixed-size image training when ``saliency_model_path`` is set
    (as the official code: SmartCrop without ``multi_aspect_ratio``), else ``random``; then
    ``crop: smart`` needs its file (not checked in validate-only mode, like the other weights)."""
    images_read = not getattr(cfg, "cache_path", None)  # a cached run never crops
    if cfg.crop == "auto":
        smart = images_read and cfg.multi_aspect_ratio is None and cfg.saliency_model_path is not None
        cfg.crop = "smart" if smart else "random"
    if cfg.crop == "smart" and images_read:
        check_saliency_file(cfg, "crop: smart")


def check_saliency_file(cfg: Any, who: str) -> None:
    """UserError (one line) unless ``saliency_model_path`` names an existing file."""
    path = cfg.saliency_model_path
    if path is None:
        raise UserError(f"{who} needs the saliency network: set config key 'saliency_model_path' "
                        f"(default models/saliency_model.pt; {GET_IT})")
    if cfg.validate_only:
        cfg.check_file("saliency_model_path")  # recorded: --validate-only checks it
    elif not os.path.isfile(path):
        raise UserError(f"config key 'saliency_model_path': file not found: {path} ({who} needs it); {GET_IT}")


def load_job_saliency(cfg: Any, device: Any = "cpu") -> torch.nn.Module:
    """The saliency network of ``saliency_model_path``, strictly loaded; a bad file is one line."""
    from fileio.errors import CheckpointError
    from modules.saliency import load_saliency_model

    check_saliency_file(cfg, f"crop: {cfg.crop}" if cfg.crop == "smart" else "the saliency masks")
    try:
        return load_saliency_model(cfg.saliency_model_path, device=device)
    except CheckpointError as exc:
        raise UserError(f"config key 'saliency_model_path': {exc}") from None
