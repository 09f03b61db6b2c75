"""What the ControlNet filters share: their errors, input checks, random draws and the separable
Gaussian blur; ``import_object`` for user classes named ``package.module:ClassName``."""
from __future__ import annotations

import importlib
import re
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

DeviceLike = Union[str, torch.device]


class FilterError(ValueError):
    """A filter was configured or called with invalid input."""


class MissingDependencyError(FilterError, ImportError):
    """An optional dependency of a filter (e.g. the face model) is not installed or not available."""


# --------------------------------------------------------------------------------------------------
# helpers


def check_images(images: Any, who: str) -> torch.Tensor:
    """Validate the filter input contract: a float tensor (B, 3, H, W) with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise FilterError(f"{who}: images must be a torch.Tensor (B,3,H,W) in [0,1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise FilterError(f"{who}: images must have shape (B,3,H,W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise FilterError(f"{who}: images must be a floating-point tensor in [0,1], got dtype {images.dtype}")
    if images.numel() == 0:
        raise FilterError(f"{who}: images is empty (shape {tuple(images.shape)})")
    # A small tolerance for resampling round-off; a [-1, 1] or [0, 255] batch is a caller bug that
    # would silently produce garbage control images, so it is refused.
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise FilterError(
            f"{who}: images must be in [0,1], got values in [{lo:.3g}, {hi:.3g}] "
            "(convert [-1,1] images with (x+1)/2, uint8 images with x/255)"
        )
    return images


def check_generator(generator: Any, who: str) -> Optional[torch.Generator]:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise FilterError(f"{who}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def uniform(generator: Optional[torch.Generator], n: int = 1) -> torch.Tensor:
    """n uniform draws in [0,1) on the CPU, from ``generator`` (on its own device) or the global RNG."""
    if generator is None:
        return torch.rand(n)
    return torch.rand(n, generator=generator, device=generator.device).cpu()


def check_probability(value: Any, name: str, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise FilterError(f"{who}: {name} must be a probability in [0,1], got {value!r}")
    return float(value)


def check_scale_factor(value: Any, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise FilterError(f"{who}: scale_factor must be a number in (0, 1] (a downscale factor), got {value!r}")
    return float(value)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [0,1] -> uint8 (B,H,W,3) RGB the way the official filters convert: ``(x*255)``
    truncated (not rounded). Clamped first so tiny negative round-off cannot wrap around to 255."""
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0
    return arr.astype(np.uint8)


def _gaussian_kernel1d(kernel_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Same discretisation as torchvision's gaussian_blur (linspace over the kernel, normalised).
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=dtype, device=device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def default_sigma(kernel_size: int) -> float:
    """torchvision's default sigma for a kernel size (141 -> 21.5, the official inpainting blur)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur_separable(x: torch.Tensor, kernel_size: int, sigma: Optional[float] = None) -> torch.Tensor:
    """Gaussian blur of (B,C,H,W) with reflect padding, equal to ``torchvision.transforms.functional.
    gaussian_blur(x, [k, k], [sigma, sigma])`` up to float round-off.

    torchvision convolves with the full 2-D kernel (k² taps per pixel: ~1.2e10 MACs for the official
    141-kernel on a 768² mask); the Gaussian is separable, so two 1-D passes give the same result
    with 2k taps, which keeps the inpainting filter cheap on CPU.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise FilterError(f"gaussian blur kernel size must be a positive odd integer, got {kernel_size}")
    if kernel_size == 1:
        return x
    sigma = default_sigma(kernel_size) if sigma is None else float(sigma)
    pad = kernel_size // 2
    if pad >= min(x.shape[-2:]):
        raise FilterError(
            f"gaussian blur kernel {kernel_size} is too large for a {x.shape[-2]}x{x.shape[-1]} image "
            "(reflect padding needs kernel//2 < image side)"
        )
    k = _gaussian_kernel1d(kernel_size, sigma, x.dtype, x.device)
    c = x.shape[1]
    y = F.pad(x, [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)
    return y


def check_call(who: str, images: Any, generator: Any, kwargs: dict, accepted: Sequence[str] = ()) -> torch.Tensor:
    """The checks every filter call starts with: no unknown per-call keyword, images (B, 3, H, W) in
    [0, 1], a generator or None; returns the images."""
    reject_kwargs(kwargs, who, accepted)
    images = check_images(images, who)
    check_generator(generator, who)
    return images


def reject_kwargs(kwargs: dict, who: str, accepted: Sequence[str]) -> None:
    """Unknown per-call keyword arguments are an error (a typo would otherwise be ignored silently)."""
    if kwargs:
        names = ", ".join(sorted(kwargs))
        known = ", ".join(accepted) if accepted else "none besides generator"
        raise FilterError(f"{who}: unknown call argument(s) {names}; accepted: {known}")


IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def import_object(path: str, what: str) -> Any:
    """Import ``package.module:Attr[.Attr]`` with importlib (no eval)."""
    if not IMPORT_PATH.match(path):
        raise FilterError(f"{what} {path!r} is not of the form 'package.module:ClassName'")
    module_name, attr_path = path.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FilterError(f"{what} {path!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise FilterError(f"{what} {path!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj
