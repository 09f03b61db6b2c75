"""Image decoding and the resize + crop to a bucket, done in the DataLoader workers.

JPEGs are decoded with PIL's draft mode straight to the smallest DCT scale that is still at least
the resize target, which skips most of the decode work for large photos.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .buckets import resize_shorter_side, resized_hw

#: webdataset extensions tried for the image, first present wins (official: jpg then png)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Refuse decompression bombs early but allow big legitimate photos.
Image.MAX_IMAGE_PIXELS = 1 << 28


class BadImage(Exception):
    """The image bytes cannot be decoded."""


def image_ext(files: dict[str, bytes]) -> str | None:
    """The extension holding the sample's image, or None."""
    for ext in IMAGE_EXTS:
        if ext in files:
            return ext
    return None


def probe_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header only (no pixel decode)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImage(f"{type(e).__name__}: {e}") from None
    if w <= 0 or h <= 0:
        raise BadImage("empty image")
    return h, w


def load_to_bucket(data: bytes, bucket: tuple[int, int], crop: str,
                   rng: np.random.Generator) -> np.ndarray:
    """Decode, resize the shorter side by the official rule, crop to ``bucket`` -> uint8 (3,h,w).

    The target size is computed from the header size so draft mode does not change the result
    size; the crop offsets come from the per-sample ``rng`` so they are reproducible on resume.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            W, H = im.size
            short = resize_shorter_side(H, W, bucket)
            th, tw = resized_hw(H, W, short)
            # float rounding in int(s * long / short) must never leave the image smaller than the bucket
            th, tw = max(th, bucket[0]), max(tw, bucket[1])
            if im.format == "JPEG":
                # Largest DCT reduction that keeps both sides >= the target.
                im.draft("RGB", (tw, th))
            im = im.convert("RGB")
            h, w = bucket
            if crop == "center":
                top, left = (th - h) // 2, (tw - w) // 2
            else:
                top = int(rng.integers(0, th - h + 1))
                left = int(rng.integers(0, tw - w + 1))
            if im.size == (tw, th):
                arr = np.asarray(im.crop((left, top, left + w, top + h)))
            else:
                # Resize only the crop window: ``box`` is the window in source pixels and PIL
                # still reads the pixels around it for the filter support, so this equals
                # resize-then-crop without resizing the discarded part. PIL's bilinear filter
                # widens its support when shrinking (the antialiased bilinear of the spec) and
                # runs single-threaded in C, outside torch's thread pool.
                sx, sy = im.size[0] / tw, im.size[1] / th
                box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
                arr = np.asarray(im.resize((w, h), Image.BILINEAR, box=box))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImage(f"{type(e).__name__}: {e}") from None
    return arr.transpose(2, 0, 1)
