"""Writing webdataset tar shards (used by make_shards, dataset caches and the test/demo data builders)."""
from __future__ import annotations

import io
import os
import tarfile
from typing import Iterable, Optional


def _add_sample(tf: tarfile.TarFile, key: str, files: dict[str, bytes]) -> None:
    for ext in sorted(files):
        data = files[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        # fixed metadata: identical inputs give byte-identical shards
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tf.addfile(info, io.BytesIO(data))


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> str:
    """Write ``(key, {ext: bytes})`` samples to ``path`` (members ``key.ext``, extensions sorted).

    Written to a temporary name and renamed, so a crash never leaves a half shard behind.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for key, files in samples:
            _add_sample(tf, key, files)
    os.replace(tmp, path)
    return path


class ShardWriter:
    """Writes samples one at a time into numbered shards ``out_dir/<prefix>-NNNNNN.tar`` of
    ``shard_size`` samples each (same member layout as :func:`write_tar`).

    Each shard is written under a temporary name and renamed when complete, so an interrupted
    run leaves only whole shards (and a ``.tmp`` file that no reader lists). ``shards`` holds the
    file names of the shards started so far, ``count`` the samples added.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", shard_size: int = 1000):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.prefix, self.shard_size = prefix, int(shard_size)
        self.shards: list[str] = []
        self.count = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._in_shard = 0
        self._tmp = ""

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: members ``key.ext`` for each ``ext -> bytes`` of ``files``."""
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} contains a dot (webdataset keys end at the first dot)")
        if self._tar is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._tmp = os.path.join(self.out_dir, name + ".tmp")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
            self.shards.append(name)
        _add_sample(self._tar, key, files)
        self.count += 1
        self._in_shard += 1
        if self._in_shard >= self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self._tmp[:-len(".tmp")])
            self._tar, self._in_shard = None, 0

    def close(self) -> list[str]:
        """Finish the last shard; returns the shard file names."""
        self._finish_shard()
        return list(self.shards)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # a failed run: keep the partial shard under its .tmp name
            self._tar.close()
            self._tar = None
