"""Bucket tables and the per-image bucket / resize rule (docs/OFFICIAL.md, Data).

Pure arithmetic, no I/O: the same functions serve fixed-size training (one square bucket) and
multi-aspect-ratio bucketing, and the tests compare them with the official tables.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from .errors import DataError

#: Bucket sides are multiples of this (official ``factor``).
FACTOR = 32


def parse_ratio(value: object, key: str = "multi_aspect_ratio") -> float:
    """Turn ``'9/16'``, ``0.5625`` or ``Fraction`` into a width/height float; DataError names the key."""
    try:
        if isinstance(value, bool):
            raise ValueError("boolean")
        r = float(Fraction(str(value).strip())) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError, TypeError):
        raise DataError(f"{key}: {value!r} is not a ratio like '9/16' or 0.5625") from None
    if not math.isfinite(r) or r <= 0:
        raise DataError(f"{key}: ratio {value!r} must be a positive finite number")
    return r


def ratio_list(ratios: Sequence[object]) -> list[float]:
    """The configured ratios in order, then each reciprocal not already present (official order)."""
    out = [parse_ratio(r) for r in ratios]
    for r in list(out):
        inv = 1 / r
        if inv not in out:
            out.append(inv)
    return out


def bucket_size(ratio: float, image_size: int, factor: int = FACTOR) -> tuple[int, int]:
    """(h, w) of the bucket for width/height ``ratio`` and area ``image_size**2``."""
    density = image_size * image_size
    h = int(math.floor(math.sqrt(density / ratio) / factor) * factor)
    w = int(math.floor(math.sqrt(density * ratio) / factor) * factor)
    return h, w


class BucketTable:
    """Ratios, their bucket sizes and the distinct buckets (insertion order = first occurrence).

    ``ratios=None`` is fixed-size training: one square bucket of ``image_size``.
    """

    def __init__(self, image_size: int, ratios: Sequence[object] | None = None,
                 random_ratio: float = 0.05):
        self.image_size = int(image_size)
        if ratios:
            self.ratios = ratio_list(ratios)
            self.sizes = [bucket_size(r, self.image_size) for r in self.ratios]
            self.random_ratio = float(random_ratio)
        else:
            self.ratios = [1.0]
            self.sizes = [(self.image_size, self.image_size)]
            self.random_ratio = 0.0
        # dict keeps first-occurrence order, which decides batch order in the official code
        self.buckets: list[tuple[int, int]] = list(dict.fromkeys(self.sizes))
        if any(h <= 0 or w <= 0 for h, w in self.buckets):
            raise DataError(f"image_size: {image_size} is too small for the configured ratios "
                            f"(a bucket side would be 0)")

    @property
    def multi(self) -> bool:
        return len(self.ratios) > 1 or self.random_ratio > 0

    def closest(self, height: int, width: int) -> tuple[int, int]:
        """Deterministic bucket: minimise |W/H - r|, first minimum wins."""
        ar = width / height
        diffs = [abs(ar - r) for r in self.ratios]
        return self.sizes[int(np.argmin(diffs))]

    def choose(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        """Bucket for an image: a uniformly random ratio with probability ``random_ratio``."""
        if self.random_ratio > 0 and rng.random() < self.random_ratio:
            return self.sizes[int(rng.integers(len(self.ratios)))]
        return self.closest(height, width)


def resize_shorter_side(height: int, width: int, bucket: tuple[int, int]) -> int:
    """Shorter-side length the image is resized to so that it covers ``bucket`` (official rule)."""
    h, w = bucket
    if (w / h - 1) * (width / height - 1) >= 0:
        return max(math.ceil(max(h, w) * min(height, width) / max(height, width)), min(h, w))
    return max(math.ceil(min(h, w) * max(height, width) / min(height, width)), max(h, w))


def resized_hw(height: int, width: int, short: int) -> tuple[int, int]:
    """Image size after resizing its shorter side to ``short`` (torchvision's int() rule)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short
