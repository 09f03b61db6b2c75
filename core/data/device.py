"""The uint8 -> float step of image batches, on the device that trains.

Workers of ``build_pipeline(..., image_dtype="uint8")`` send images as uint8 (a quarter of the
float32 bytes through shared memory, pinned memory and the host-to-device copy); the training
process converts them here, after the copy. The result is bitwise the float32 batch the workers
make with ``image_dtype="float32"`` (``np.divide(uint8, float32(255))``): both are one correctly
rounded float32 division per pixel.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["images_to_float"]

Device = Union[str, torch.device, None]


def images_to_float(images: torch.Tensor, device: Device = None, non_blocking: bool = True) -> torch.Tensor:
    """uint8 images (any shape) in [0, 255] -> float32 in [0, 1] on ``device`` (None: where they are).

    A float tensor is only moved (it was converted already). ``non_blocking`` overlaps the copy
    from pinned memory with the work queued before it.
    """
    x = images.to(device, non_blocking=non_blocking) if device is not None else images
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise TypeError(f"images: expected uint8 or float images, got {x.dtype}")
        return x
    # The divisor is a tensor on the same device, not a Python number: CUDA turns division by a
    # host scalar into a multiplication by its reciprocal, which is not always the correctly
    # rounded quotient (and then not bitwise the workers' float path).
    divisor = torch.tensor(255.0, dtype=torch.float32, device=x.device)
    return x.to(torch.float32).div_(divisor)


def batch_images_to_float(batch: dict, key: str, device: Device = None,
                          non_blocking: bool = True) -> dict:
    """``batch`` with ``batch[key]`` converted by :func:`images_to_float` (same dict, key order kept)."""
    value: Optional[torch.Tensor] = batch.get(key)
    if isinstance(value, torch.Tensor):
        batch[key] = images_to_float(value, device, non_blocking)
    return batch
