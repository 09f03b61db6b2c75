"""CLIP conditioning encoders (text and image) used by Stage C and Stage B.

The official scripts condition on:
* the tokenizer + ``CLIPTextModelWithProjection`` of ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``
  (``clip_text`` = output of the LAST transformer layer BEFORE the final layer norm, all 77 positions;
  ``clip_text_pooled`` = ``text_embeds``, the projected EOS token, as (B, 1, C));
* ``CLIPVisionModelWithProjection`` of ``openai/clip-vit-large-patch14`` (``image_embeds`` as (B, 1, C)).

Models are loaded from a local folder or a Hugging Face hub id. Nothing is downloaded when the hub is
offline (``HF_HUB_OFFLINE=1``) or ``local_files_only=True``: a model that is neither a local folder nor
in the local cache raises :class:`ClipModelNotFoundError` saying how to fetch it.

Small random CLIP folders for tests and the CPU demo are written by ``tools/tiny_clip.py``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from fileio.errors import CheckpointError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 77  # CLIP's context length; Stage C's clip_text is always (B, 77, C)


class ClipModelNotFoundError(CheckpointError, OSError):
    """A CLIP model/tokenizer is neither a local folder nor available from the (offline) hub cache.

    A CheckpointError, so command lines print it as one line (a user-fixable path); still an
    OSError, which callers caught before."""


# --------------------------------------------------------------------------------------------------
# Loading


def _hub_offline() -> bool:
    """True when the user asked Hugging Face libraries not to touch the network."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def looks_like_hub_id(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else (absolute, relative with ./, deeper paths,
    # ~) can only be meant as a local folder.
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    return name.count("/") <= 1 and name.strip() == name and name != ""


def _from_pretrained(loader, name_or_path: str, what: str, local_files_only: bool | None, **kwargs):
    """Call ``loader(source, ...)`` for a local folder or a hub id, with errors that say how to fix."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{what}: name_or_path must be a hub id or a folder path, got {type(name_or_path)!r}")
    name = os.fspath(name_or_path)
    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            return loader(str(folder), local_files_only=True, **kwargs)
        except OSError as err:
            raise ClipModelNotFoundError(
                f"{what}: local folder '{folder}' does not hold a loadable model/tokenizer ({err}). "
                "Expected the files written by save_pretrained (config.json + model.safetensors, or "
                "tokenizer files)."
            ) from err
    if folder.exists():
        raise ClipModelNotFoundError(
            f"{what}: '{name}' is a file; expected a folder written by save_pretrained or a hub id"
        )
    if not looks_like_hub_id(name):
        raise ClipModelNotFoundError(
            f"{what}: folder '{name}' does not exist. Point the config key at a folder holding the model "
            "(e.g. one written by `python3 tools/tiny_clip.py DIR`) or use a hub id."
        )
    offline = _hub_offline() if local_files_only is None else local_files_only
    try:
        return loader(name, local_files_only=offline, **kwargs)
    except Exception as err:  # re-raised with the fix; hub/network errors have many unrelated types
        mode = "offline mode / local_files_only" if offline else "download failed"
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ClipModelNotFoundError(
            f"{what}: hub model '{name}' is not a local folder and not in the Hugging Face cache ({mode}: "
            f"{type(err).__name__}: {reason}). Download it on a machine with internet access with "
            f"`huggingface-cli download {name}` (or `hf download {name}`), then run with HF_HUB_OFFLINE=1, "
            "or point the config key at a local folder holding it."
        ) from err


def load_tokenizer(name_or_path: str, local_files_only: bool | None = None):
    """Load the CLIP tokenizer (``AutoTokenizer``) from a local folder or hub id.

    ``local_files_only=None`` follows ``HF_HUB_OFFLINE``; ``True`` never touches the network.
    """
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "CLIP tokenizer", local_files_only)


def _load_frozen(class_name: str, name_or_path: str, what: str, dtype: torch.dtype, device: str | torch.device,
                 local_files_only: bool | None) -> Any:
    """``transformers.<class_name>`` from ``name_or_path``, frozen: eval mode, no parameter gradients."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{what}: dtype must be a torch.dtype, got {dtype!r}")
    import transformers
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar per model; our callers log what they load, and the
    # bar would otherwise land in front of one-line user errors.
    hf_logging.disable_progress_bar()
    model_cls = getattr(transformers, class_name)
    model = _from_pretrained(model_cls.from_pretrained, name_or_path, what, local_files_only, dtype=dtype)
    from fileio.finite import check_finite

    check_finite(model.state_dict(), f"{what} {os.fspath(name_or_path)}")  # a damaged input is named at load
    # Frozen encoders: eval (no dropout) and no parameter gradients. Gradients can still flow to
    # parametrizations added later (ReToken on the token embedding), so encode_text does not force
    # no_grad.
    return model.to(device=device).eval().requires_grad_(False)


def load_clip_text(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   local_files_only: bool | None = None) -> Any:
    """Load a frozen ``CLIPTextModelWithProjection`` (eval mode, ``requires_grad=False``)."""
    return _load_frozen("CLIPTextModelWithProjection", name_or_path, "CLIP text model", dtype, device, local_files_only)


def load_clip_vision(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     local_files_only: bool | None = None) -> Any:
    """Load a frozen ``CLIPVisionModelWithProjection`` (eval mode, ``requires_grad=False``)."""
    return _load_frozen("CLIPVisionModelWithProjection", name_or_path, "CLIP vision model", dtype, device,
                        local_files_only)


# --------------------------------------------------------------------------------------------------
# Encoding


def encode_text(tokenizer, text_model, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Encode captions as Stage C/B expect: ``(clip_text (B,77,C), clip_text_pooled (B,1,P))``.

    Tokenised to exactly 77 ids (truncation + max_length padding); input_ids AND attention_mask are
    passed, because the mask changes the hidden states at padding positions, which are part of
    clip_text. ``clip_text`` is ``hidden_states[-1]`` (before the final layer norm, unlike
    ``last_hidden_state``). The empty string is a valid caption (the unconditional embedding).
    Runs with whatever grad mode the caller set.
    """
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError("encode_text: captions must be a list of strings (wrap a single caption in a list)")
    if len(captions) == 0:
        raise ValueError("encode_text: captions is empty")
    tokens = tokenizer(
        list(captions), truncation=True, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt"
    )
    device = next(text_model.parameters()).device
    out = text_model(
        input_ids=tokens["input_ids"].to(device),
        attention_mask=tokens["attention_mask"].to(device),
        output_hidden_states=True,
    )
    return out.hidden_states[-1], out.text_embeds.unsqueeze(1)


def clip_preprocess(images: Tensor, size: int = 224) -> Tensor:
    """CLIP image preprocessing: shorter side -> ``size`` (bicubic, antialiased), centre crop, normalise.

    ``images``: float (B,3,H,W) in [0,1]. Computed in float32 (bicubic resize is not available for
    every low-precision dtype on CPU). Antialias is on, matching torchvision >= 0.17 on tensors.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images)
        raise ValueError(f"clip_preprocess: images must be a (B,3,H,W) tensor in [0,1], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"clip_preprocess: images must be float in [0,1], got {images.dtype}")
    x = images.float()
    x = TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size])
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_images_clip(vision_model, images: Tensor) -> Tensor:
    """CLIP image embeddings (``image_embeds``, not L2-normalised) of [0,1] images -> (B, 1, C).

    The crop size comes from the model config (224 for ViT-L/14; small for the tiny test model).
    """
    param = next(vision_model.parameters())
    pixels = clip_preprocess(images, size=int(vision_model.config.image_size))
    out = vision_model(pixel_values=pixels.to(device=param.device, dtype=param.dtype))
    return out.image_embeds.unsqueeze(1)
