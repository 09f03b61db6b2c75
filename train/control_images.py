"""Pre-computed ControlNet inputs stored next to the images in the shards (e.g. ``0000.control.png``).

TODO(data layer owner): the data layer's batches carry only ``images``/``captions``/``keys``/``urls``/
``json``; extra files of a sample are not passed through. Until it can decode extra image keys with
the SAME resize/crop as the image, this reader fetches the file by (shard url, sample key) and
decodes it with the data layer's own resize rule and a centre crop. That matches the image's crop
only when the image was centre-cropped too, so ``train_c_controlnet.py`` requires ``crop: center``
with ``control_image_key``. Shards are indexed once (key -> byte offset of the sample) and each
control file is read by seeking to its sample.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from core.errors import UserError


class ControlImageReader:
    """Reads ``key.<ext>`` files of samples, resized/cropped like the batch's images."""

    def __init__(self, ext: str) -> None:
        self.ext = ext.lower().lstrip(".")
        self._index: dict[str, dict[str, int]] = {}

    def _offsets(self, url: str) -> dict[str, int]:
        if url not in self._index:
            from core.data.sources import open_shard
            from core.data.tario import TarTruncated, iter_samples

            offsets: dict[str, int] = {}
            with open_shard(url) as fh:
                try:
                    for sample in iter_samples(fh):
                        offsets[sample.key] = sample.offset
                except TarTruncated:
                    pass  # the data layer reports truncated shards; complete samples are indexed
            self._index[url] = offsets
        return self._index[url]

    def read_bytes(self, url: str, key: str) -> bytes:
        from core.data.sources import open_shard
        from core.data.tario import iter_samples

        offset = self._offsets(url).get(key)
        if offset is not None:
            with open_shard(url, offset) as fh:
                sample: Optional[object] = next(iter_samples(fh, offset), None)
            data = getattr(sample, "files", {}).get(self.ext) if sample is not None else None
            if data is not None:
                return data
        raise UserError(f"control_image_key '{self.ext}': sample {key} in {url} has no {key}.{self.ext}; "
                        f"every sample needs its control image (or use controlnet_filter without control_image_key)")

    def load(self, urls: list[str], keys: list[str], size: tuple[int, int]) -> torch.Tensor:
        """Control images (B, 3, h, w) in [0, 1] for the batch samples ``(urls[i], keys[i])``."""
        from core.data.images import BadImage, load_to_bucket

        out = []
        for url, key in zip(urls, keys):
            try:
                arr = load_to_bucket(self.read_bytes(url, key), tuple(size), "center", np.random.default_rng(0))
            except BadImage as exc:
                raise UserError(f"control image {key}.{self.ext} in {url} cannot be decoded ({exc})") from None
            out.append(torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0))
        return torch.stack(out)
