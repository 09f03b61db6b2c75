"""Image decoding and the resize + crop to a bucket, done in the DataLoader workers.

JPEGs are decoded with PIL's draft mode straight to the smallest DCT scale that is still at least
the resize target, which skips most of the decode work for large photos.

Every mode PIL reads becomes 8-bit RGB by one rule (:func:`to_rgb`):

* ``RGB`` as is; ``L``, ``1`` (1-bit), ``CMYK``, ``YCbCr`` (and other colour modes PIL converts)
  through PIL's own conversion;
* 16-bit and 32-bit integer grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``) scaled from
  [0, 65535] (the 16-bit range; ``I`` is what older PIL versions return for 16-bit PNGs) to
  [0, 255] with rounding, values outside clipped. 16-bit RGB(A) PNGs are read by PIL as 8-bit
  RGB(A) holding the high byte, which is already the scaled value;
* floating-point grey (``F``) as intensities in [0, 1] (the convention of float images in
  scikit-image, OpenCV, torchvision), values outside clipped; a NaN or infinite pixel makes the
  image bad data;
* transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, palette or colour-key
  ``transparency`` in the PNG/GIF info) composited over white: the colour under fully transparent
  pixels is arbitrary (often black or garbage) and these images (logos, cut-outs, stickers) are
  made to be seen on a light page, which is also what browsers show. The official code dropped
  the alpha channel instead (``convert('RGB')``), exposing that arbitrary colour.

Images larger than ``max_pixels`` (``DataConfig.max_image_pixels``) are refused from the header
size, before any pixel is decoded (:class:`ImageTooLarge`).
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from .buckets import resize_shorter_side, resized_hw
from .smartcrop import smart_crop

#: webdataset extensions tried for the image, first present wins (official: jpg then png)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

#: Upper bound of ``max_image_pixels``: PIL's decompression-bomb limit as set here (PIL warns
#: above it and refuses twice as many pixels on its own).
PIL_MAX_PIXELS = 1 << 28

# Refuse decompression bombs early but allow big legitimate photos.
Image.MAX_IMAGE_PIXELS = PIL_MAX_PIXELS

#: Default of ``DataConfig.max_image_pixels``: 100 megapixels (a decoded 100 MP image needs
#: 300 MB as RGB, a few times that while converting).
DEFAULT_MAX_PIXELS = 100_000_000

_WHITE = (255, 255, 255)
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# round(v * 255 / 65535) for every 16-bit value, in integers: 32768 (mid-grey) -> 128
_LUT16 = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


class BadImage(Exception):
    """The image bytes cannot be decoded."""


class ImageTooLarge(BadImage):
    """The image's header size exceeds the configured pixel-count limit (never decoded)."""


def image_ext(files: dict[str, bytes]) -> str | None:
    """The extension holding the sample's image, or None."""
    for ext in IMAGE_EXTS:
        if ext in files:
            return ext
    return None


def mask_member(files: dict[str, bytes]) -> bytes | None:
    """The sample's ``KEY.mask.<image ext>`` member (its loss mask), or None."""
    for ext in IMAGE_EXTS:
        if f"mask.{ext}" in files:
            return files[f"mask.{ext}"]
    return None


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own bound, above any allowed limit
        raise ImageTooLarge(f"DecompressionBombError: {e}") from None


def _check_size(w: int, h: int, max_pixels: int | None) -> None:
    if w <= 0 or h <= 0:
        raise BadImage("empty image")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds max_image_pixels = {max_pixels} "
                            f"(not decoded)")


def probe_size(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) from the header only (no pixel decode).

    Raises ImageTooLarge when width x height exceeds ``max_pixels`` (None: no limit but PIL's).
    """
    try:
        with _open(data) as im:
            w, h = im.size
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImage(f"{type(e).__name__}: {e}") from None
    _check_size(w, h, max_pixels)
    return h, w


def _grey_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "L").convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` (any mode PIL reads) as an 8-bit RGB image, by the rules of the module docstring."""
    mode = im.mode
    if mode in _INT_MODES:
        a = np.asarray(im)
        if a.dtype.itemsize > 2:  # mode I: 32-bit signed
            a = np.minimum(np.maximum(a, 0), 65535)
        # a table lookup keeps the peak at one uint8 image beyond the decoded one
        return _grey_to_rgb(_LUT16[a])
    if mode == "F":
        a = np.array(im, dtype=np.float32)
        if not np.isfinite(a).all():
            raise BadImage("mode F image holds NaN or infinite pixel values")
        np.maximum(a, 0.0, out=a)
        np.minimum(a, 1.0, out=a)
        a *= 255.0
        return _grey_to_rgb(np.rint(a, out=a))
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode == "RGB":
        return im  # convert() would copy it
    return im.convert("RGB")


def crop_window(H: int, W: int, bucket: tuple[int, int], crop: str,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(th, tw, top, left)``: the resized size of an ``H`` x ``W`` image (shorter side by the
    official rule, never below the bucket) and the crop window's corner in it (None for ``smart``,
    whose window comes from the saliency map). Random offsets are two draws of ``rng`` (top, left)."""
    short = resize_shorter_side(H, W, bucket)
    th, tw = resized_hw(H, W, short)
    # float rounding in int(s * long / short) must never leave the image smaller than the bucket
    th, tw = max(th, bucket[0]), max(tw, bucket[1])
    h, w = bucket
    if crop == "smart":
        return th, tw, None, None  # type: ignore[return-value]
    if crop == "center":
        return th, tw, (th - h) // 2, (tw - w) // 2
    return th, tw, int(rng.integers(0, th - h + 1)), int(rng.integers(0, tw - w + 1))


def _window(im: Image.Image, th: int, tw: int, top: int, left: int, bucket: tuple[int, int]) -> np.ndarray:
    """The ``bucket`` window at (top, left) of ``im`` resized to (th, tw), as an array."""
    h, w = bucket
    if im.size == (tw, th):
        return np.asarray(im.crop((left, top, left + w, top + h)))
    # Resize only the crop window: ``box`` is the window in source pixels and PIL still reads the
    # pixels around it for the filter support, so this equals resize-then-crop without resizing the
    # discarded part. PIL's bilinear filter widens its support when shrinking (the antialiased
    # bilinear of the spec) and runs single-threaded in C, outside torch's thread pool.
    sx, sy = im.size[0] / tw, im.size[1] / th
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return np.asarray(im.resize((w, h), Image.BILINEAR, box=box))


def mask_to_bucket(image: bytes, mask: bytes | None, bucket: tuple[int, int], crop: str,
                   rng: np.random.Generator) -> np.ndarray | None:
    """The loss mask of a sample, cut like its image: uint8 (1, h, w) (255 = train here), or None
    when the sample has none. From ``mask`` (the ``KEY.mask.png`` bytes, any mode: its grey level;
    resized to the image's size when it differs) or else the image's alpha channel. ``rng`` must
    be a fresh copy of the image's crop generator (same draws, same window)."""
    try:
        with _open(image) as im:
            W, H = im.size
            if mask is None:
                if im.mode not in _ALPHA_MODES and "transparency" not in im.info:
                    return None
                m = im.convert("RGBA").getchannel("A")
            else:
                with _open(mask) as mim:
                    m = mim.convert("L")
                    m.load()
            if m.size != (W, H):
                m = m.resize((W, H), Image.BILINEAR)
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImage(f"mask: {type(e).__name__}: {e}") from None
    if crop == "smart":
        raise BadImage("masks do not combine with crop: smart")
    th, tw, top, left = crop_window(H, W, bucket, crop, rng)
    return _window(m, th, tw, top, left, bucket)[None]


def load_to_bucket(data: bytes, bucket: tuple[int, int], crop: str,
                   rng: np.random.Generator, max_pixels: int | None = None,
                   saliency: Any = None) -> np.ndarray:
    """Decode, resize the shorter side by the official rule, crop to ``bucket`` -> uint8 (3,h,w).

    The target size is computed from the header size so draft mode does not change the result
    size; the crop offsets come from the per-sample ``rng`` so they are reproducible on resume.
    An image over ``max_pixels`` raises ImageTooLarge before its pixels are decoded.
    ``crop='smart'`` resizes the whole image and crops around its salient part as computed by
    the ``saliency`` function (``smartcrop.py``).
    """
    try:
        with _open(data) as im:
            W, H = im.size
            _check_size(W, H, max_pixels)
            th, tw, top, left = crop_window(H, W, bucket, crop, rng)
            if im.format == "JPEG":
                # Largest DCT reduction that keeps both sides >= the target.
                im.draft("RGB", (tw, th))
            im = to_rgb(im)
            if crop == "smart":  # the whole resized image: the crop is chosen from its saliency
                arr = np.asarray(im if im.size == (tw, th) else im.resize((tw, th), Image.BILINEAR))
            else:
                arr = _window(im, th, tw, top, left, bucket)
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise BadImage(f"{type(e).__name__}: {e}") from None
    if crop == "smart":  # outside the try: a failing saliency function is a bug, not bad data
        return smart_crop(arr.transpose(2, 0, 1), bucket, saliency, rng)
    return arr.transpose(2, 0, 1)
