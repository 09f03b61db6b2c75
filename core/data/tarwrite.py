"""Writing webdataset tar shards (used by make_shards and the test/demo data builders)."""
from __future__ import annotations

import io
import os
import tarfile
from typing import Iterable


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> str:
    """Write ``(key, {ext: bytes})`` samples to ``path`` (members ``key.ext``, extensions sorted).

    Written to a temporary name and renamed, so a crash never leaves a half shard behind.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for key, files in samples:
            for ext in sorted(files):
                data = files[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                # fixed metadata: identical inputs give byte-identical shards
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path
