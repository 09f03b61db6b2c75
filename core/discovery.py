"""What a run reports about its data before it creates any folder or loads any model: the shards
(or image-folder chunks) ``webdataset_path`` names and, when cheap, how many images they hold.

A missing or empty dataset then fails in a second with nothing written (issue 26: a failed run
used to leave empty ``checkpoint_path/<id>/`` and ``output_path/<id>/`` folders behind).
"""
from __future__ import annotations

import logging
import os
import tarfile
from typing import Any, Optional

__all__ = ["discover_data", "count_images"]

log = logging.getLogger("cascade.train")

#: counting opens every local tar and reads its headers: skipped above this many shards
MAX_COUNTED_SHARDS = 256
_IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp"}


def count_images(urls: list[str]) -> Optional[int]:
    """Images (samples with an image member) in local tar shards and image-folder chunks; None when
    a shard is remote or there are too many to count quickly."""
    from core.data.imagefolder import listing_for, is_chunk_url

    if len(urls) > MAX_COUNTED_SHARDS:
        return None
    total, folders = 0, set()
    for url in urls:
        if is_chunk_url(url):
            listing, _ = listing_for(url)
            if listing.folder not in folders:
                folders.add(listing.folder)
                total += sum(1 for _, files in listing.samples if any(e.lower() in _IMAGE_EXTS for e, _, _ in files))
            continue
        if not os.path.isfile(url):
            return None
        try:
            with tarfile.open(url, mode="r:") as tar:
                keys = {m.name.split(".", 1)[0] for m in tar if m.name.rsplit(".", 1)[-1].lower() in _IMAGE_EXTS}
        except (OSError, tarfile.TarError):
            return None  # the data pipeline reports a broken shard, with its policy
        total += len(keys)
    return total


def discover_data(cfg: Any) -> Optional[list[str]]:
    """List the run's shards (DataError when there are none), log how many and the images they
    hold; None for a run that reads a feature cache (``cache_path``, checked by the config)."""
    if getattr(cfg, "cache_path", None) or getattr(cfg, "webdataset_path", None) is None:
        return None  # a cache, or datasets the job lists itself (concepts: one summary line each)
    from core.data import expand_sources

    urls = list(expand_sources(cfg.webdataset_path))
    images = count_images(urls)
    found = f"{images} image(s) in " if images is not None else ""
    log.info("data: %s%d shard(s) of webdataset_path (first: %s)", found, len(urls), urls[0])
    if images is not None and images < getattr(cfg, "batch_size", 0):
        log.warning("data: %d image(s) but batch_size %d: every batch repeats images (several epochs per update)",
                    images, cfg.batch_size)
    return urls
