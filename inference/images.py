"""Image conversions and files: PIL <-> tensors, loading inputs, PNGs with text metadata."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from inference.errors import UserError

ImageLike = Union[Image.Image, torch.Tensor, np.ndarray, str, os.PathLike]


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open an image file as RGB; a missing or unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


def to_tensor(image: ImageLike) -> torch.Tensor:
    """One image (PIL, path, HWC uint8/float array or CHW/BCHW tensor) -> float (1,3,H,W) in [0,1]."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        image = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"unsupported image type {type(image).__name__}")
    tensor = image.float()
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.size(1) != 3:
        raise ValueError(f"expected an RGB image, got a tensor of shape {tuple(image.shape)}")
    return tensor.clamp(0, 1)


def to_batch(images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
    """Several images of the SAME size -> (B,3,H,W); a single image or a batch tensor passes."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return to_tensor(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    tensors = [to_tensor(img) for img in images]
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) != 1:
        raise UserError(f"images in one batch must have the same size, got {sorted(sizes)}")
    return torch.cat(tensors)


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear antialiased resize (no-op when the size already matches)."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def resize_cover_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize so the image covers HxW (aspect kept), then centre-crop to exactly HxW."""
    h, w = images.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    images = resize(images, new_h, new_w)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return images[..., top:top + height, left:left + width]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) in [0,1] -> list of RGB PIL images (rounded to uint8)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in array]


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two images next to each other (the right one resized to the left one's height)."""
    if right.height != left.height:
        right = right.resize((round(right.width * left.height / right.height), left.height))
    canvas = Image.new("RGB", (left.width + right.width, left.height))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def save_png(image: Image.Image, path: Union[str, os.PathLike], metadata: Mapping[str, Any]) -> Path:
    """Write a PNG with every metadata entry as a text chunk (non-strings as JSON)."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        info.add_text(str(key), text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: Union[str, os.PathLike]) -> dict[str, str]:
    """The text chunks of a PNG (as written by :func:`save_png`)."""
    with Image.open(path) as img:
        return dict(getattr(img, "text", {}) or img.info)

