"""Shard writers for tests and benchmarks: real photographs, real tar shards.

The photos are scikit-image's bundled sample photographs, cropped and resized to the requested
sizes and JPEG-encoded, so decoding and resizing behave like on real data.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from core.data.tarwrite import write_tar

__all__ = ["write_photo_shards", "write_tar", "make_sample", "photo_variant", "jpeg_bytes"]

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg")

#: (height, width) sizes cycled through by default: square, portrait and landscape.
DEFAULT_SIZES = ((96, 96), (128, 96), (96, 144), (80, 160), (160, 80), (112, 112), (64, 128))


def photo_dir() -> str:
    """scikit-image's data folder (located without importing scikit-image)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is needed for the sample photographs")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@lru_cache(maxsize=None)
def load_photo(name: str) -> Image.Image:
    with Image.open(os.path.join(photo_dir(), name)) as im:
        return im.convert("RGB")


def photo_variant(index: int, height: int, width: int, seed: int = 0) -> Image.Image:
    """A (height, width) crop-and-resize of one of the photos, varying with ``index``."""
    photo = load_photo(PHOTOS[index % len(PHOTOS)])
    rng = np.random.default_rng([seed, index])
    W, H = photo.size
    target = width / height
    # largest crop of the target aspect ratio, scaled down a bit at random, placed at random
    cw, ch = (W, int(W / target)) if W / H < target else (int(H * target), H)
    scale = rng.uniform(0.6, 1.0)
    cw, ch = max(8, int(cw * scale)), max(8, int(ch * scale))
    left = int(rng.integers(0, W - cw + 1))
    top = int(rng.integers(0, H - ch + 1))
    return photo.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BILINEAR)


def jpeg_bytes(im: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_sample(index: int, height: int, width: int, seed: int = 0, with_json: bool = True,
                quality: int = 85) -> dict[str, bytes]:
    """The files of sample ``index``: jpg, txt and (optionally) json metadata."""
    photo = PHOTOS[index % len(PHOTOS)].split(".")[0].replace("_", " ")
    caption = f"a photo of {photo}, sample {index}"
    files = {"jpg": jpeg_bytes(photo_variant(index, height, width, seed), quality),
             "txt": caption.encode()}
    if with_json:
        meta = {"aesthetic_score": round(3.0 + (index * 0.37) % 4.0, 3), "width": width,
                "height": height, "caption": f"json caption {index}",
                "old_caption": json.dumps({"og_caption": f"original caption {index}"}), "index": index}
        files["json"] = json.dumps(meta).encode()
    return files


def write_photo_shards(out_dir: str, n_samples: int, shard_size: int,
                       sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, with_json: bool = True,
                       seed: int = 0, prefix: str = "shard", quality: int = 85) -> list[str]:
    """Write ``n_samples`` photo samples into shards of ``shard_size``; returns the shard paths.

    Sample ``i`` has key ``f"{i:06d}"``, size ``sizes[i % len(sizes)]`` (height, width), caption
    ``"a photo of <name>, sample i"`` and json with ``aesthetic_score``, ``width``, ``height``,
    ``caption``, ``old_caption`` and ``index``.
    """
    paths = []
    for s, start in enumerate(range(0, n_samples, shard_size)):
        samples = []
        for i in range(start, min(n_samples, start + shard_size)):
            h, w = sizes[i % len(sizes)]
            samples.append((f"{i:06d}", make_sample(i, h, w, seed, with_json, quality)))
        paths.append(write_tar(os.path.join(out_dir, f"{prefix}-{s:04d}.tar"), samples))
    return paths
