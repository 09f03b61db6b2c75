"""A plain folder of images with same-stem captions, read as if it were tar shards.

A folder (sub-folders included) holding ``name.jpg`` + ``name.txt`` (+ ``name.json``) is a dataset
as it is. It is listed once, in a stable order, into samples (one per stem), and the sorted sample
list is cut into *chunks* of :data:`CHUNK_SAMPLES` consecutive samples. Each chunk is one "shard"
of the shard plan: its URL is ``<folder>/#chunk-<i>-of-<n>-<digest>`` and :func:`open_chunk`
serves it as the byte stream of the tar shard ``make_shards`` would write for it (members
``key.ext``, extensions sorted, a pax header each), generated on the fly from the files. So the
shard plan, rank/worker split, shuffling, filters, bucketing, caption keys, bad-data accounting
and exact resume (byte offsets in the virtual stream) are the tar path's, unchanged.

* Sample key: the path of the stem relative to the folder, ``/``-separated, dots replaced by
  ``_`` (as ``make_shards`` does: webdataset keys end at the first dot): ``sub/0001.v2.jpg`` is
  key ``sub/0001_v2``, extension ``jpg``.
* Files taken: the image extensions of ``images.IMAGE_EXTS`` (``.jpeg`` read as ``jpg``), ``.txt``
  and ``.json``, case-insensitive; ``name.mask.png`` (any image extension) is the loss mask of
  sample ``name`` (member ``name.mask.png``, as in a tar shard); hidden files and folders (leading ``.``) and other files are
  ignored. Linked sub-folders are followed, except links back into the folders being scanned
  (loops). An unlistable sub-folder is a DataError. A stem with a caption or json but no image is a sample too, so the pipeline reports
  it (``missing_image``, with its key) instead of dropping it silently.
* ``<digest>`` hashes the listing (keys, extensions, sizes): a changed folder gives other shard
  names, so a saved position from before the change restarts at the next epoch (warning)
  instead of resuming inexactly, and a worker that lists a folder that changed since the run
  started stops with a DataError. Files must not change during a run (a size change is an error).
"""
from __future__ import annotations

import bisect
import errno
import hashlib
import os
import re
import stat
import tarfile
import threading
from dataclasses import dataclass
from typing import BinaryIO

from .errors import DataError
from .images import IMAGE_EXTS

#: Samples per chunk (one shard of the plan). Small, so that the per-epoch shard shuffle mixes a
#: folder well and several workers get chunks of their own.
CHUNK_SAMPLES = 64

_EXTS = frozenset(IMAGE_EXTS) | {"txt", "json"}
_MARK = "#chunk-"
_URL_RE = re.compile(r"^(?P<folder>.*)/#chunk-(?P<i>\d+)-of-(?P<n>\d+)-(?P<digest>[0-9a-f]{16})$")
BLOCK = 512


@dataclass(frozen=True)
class Listing:
    """A listed folder: ``samples[i] = (key, ((ext, path, size), ...))`` sorted by key."""

    folder: str
    samples: tuple[tuple[str, tuple[tuple[str, str, int], ...]], ...]
    digest: str

    @property
    def n_chunks(self) -> int:
        return max(1, -(-len(self.samples) // CHUNK_SAMPLES))

    def chunk_url(self, i: int) -> str:
        return f"{self.folder}/{_MARK}{i:05d}-of-{self.n_chunks:05d}-{self.digest}"


_cache: dict[str, Listing] = {}
_lock = threading.Lock()


def is_chunk_url(url: str) -> bool:
    """True for the URL of a folder chunk (what :func:`chunk_urls` returns)."""
    return _MARK in url and _URL_RE.match(url) is not None


def list_folder(folder: str) -> Listing:
    """List ``folder`` (absolute path) into samples; DataError when it holds none."""
    groups: dict[str, dict[str, tuple[str, int]]] = {}

    def unreadable(e: OSError) -> None:
        raise DataError(f"webdataset_path: image folder {folder}: cannot list {e.filename}: {e.strerror}")

    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        # linked sub-folders are followed (datasets assembled from links), except a link to a
        # folder the walk is already inside, which would loop
        inside, here = set(), folder
        inside.add(os.path.realpath(here))
        for part in os.path.relpath(root, folder).split(os.sep):
            if part != ".":
                here = os.path.join(here, part)
                inside.add(os.path.realpath(here))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(root, d)) not in inside)
        for fn in sorted(files):
            stem, dot, ext = fn.rpartition(".")
            ext = ext.lower()
            if not dot or not stem or fn.startswith(".") or ext not in _EXTS:
                continue
            ext = "jpg" if ext == "jpeg" else ext
            if stem.lower().endswith(".mask") and ext in IMAGE_EXTS and len(stem) > 5:
                stem, ext = stem[:-5], f"mask.{ext}"  # name.mask.png: the loss mask of sample `name`
            path = os.path.join(root, fn)
            rel = os.path.relpath(os.path.join(root, stem), folder)
            key = rel.replace(os.sep, "/").replace(".", "_")
            group = groups.setdefault(key, {})
            if ext in group:
                raise DataError(f"webdataset_path: image folder {folder}: {group[ext][0]} and {path} "
                                f"both give sample {key!r} a .{ext} file; rename one")
            try:
                st = os.stat(path)
            except OSError as e:
                raise DataError(f"webdataset_path: image folder {folder}: cannot read {path}: "
                                f"{e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader forever, a device read without end
                raise DataError(f"webdataset_path: image folder {folder}: {path} is not a regular file; "
                                f"remove it or replace it with the image")
            if not os.access(path, os.R_OK):  # found now, not after minutes of training
                raise DataError(f"webdataset_path: image folder {folder}: cannot read {path}: "
                                f"{os.strerror(errno.EACCES)}")
            group[ext] = (path, st.st_size)
    if not groups:
        raise DataError(f"webdataset_path: directory {folder} holds no .tar shards and no images "
                        f"({', '.join('.' + e for e in IMAGE_EXTS)})")
    samples = tuple((key, tuple((ext, *groups[key][ext]) for ext in sorted(groups[key])))
                    for key in sorted(groups))
    h = hashlib.blake2b(digest_size=8)
    for key, files in samples:
        h.update(key.encode("utf-8", "surrogateescape") + b"\0")
        for ext, _path, size in files:
            h.update(f"{ext}:{size}\0".encode())
    return Listing(folder, samples, h.hexdigest())


def chunk_urls(folder: str) -> list[str]:
    """The chunk URLs of ``folder`` (listed now; the listing is kept for this process)."""
    listing = list_folder(folder)
    with _lock:
        _cache[folder] = listing
    return [listing.chunk_url(i) for i in range(listing.n_chunks)]


def listing_for(url: str) -> tuple[Listing, int]:
    m = _URL_RE.match(url)
    if m is None:
        raise DataError(f"{url}: not an image-folder chunk URL")
    folder, digest = m["folder"], m["digest"]
    with _lock:
        listing = _cache.get(folder)
    if listing is None or listing.digest != digest:
        listing = list_folder(folder)   # a worker process, or a folder listed again
        with _lock:
            _cache[folder] = listing
    if listing.digest != digest or listing.n_chunks != int(m["n"]):
        raise DataError(f"webdataset_path: image folder {folder} changed since the run started "
                        f"(files added, removed or resized); do not edit a dataset folder during a run")
    return listing, int(m["i"])


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class ChunkReader:
    """The tar byte stream of one folder chunk, from byte ``offset`` on (a read-only file object).

    The layout (headers, file sizes, padding) is fixed by the listing, so offsets are the same in
    every process and on every run over the same folder.
    """

    def __init__(self, url: str, offset: int = 0):
        listing, i = listing_for(url)
        self.url = url
        self.folder = listing.folder
        # segments: (start, header bytes or None, file path or None, length)
        self._starts: list[int] = []
        self._segs: list[tuple[bytes | None, str | None, int]] = []
        pos = 0
        for key, files in listing.samples[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES]:
            for ext, path, size in files:
                hdr = _header(f"{key}.{ext}", size)
                self._add(pos, hdr, None, len(hdr))
                pos += len(hdr)
                self._add(pos, None, path, size)
                pos += -(-size // BLOCK) * BLOCK   # data padded to whole blocks (zeros)
        self._add(pos, b"\0" * (2 * BLOCK), None, 2 * BLOCK)
        self.size = pos + 2 * BLOCK
        self.pos = min(offset, self.size)
        self._file: BinaryIO | None = None
        self._file_seg = -1

    def _add(self, start: int, data: bytes | None, path: str | None, length: int) -> None:
        self._starts.append(start)
        self._segs.append((data, path, length))

    def _open_file(self, seg: int, path: str, size: int) -> BinaryIO:
        if self._file_seg != seg:
            self._close_file()
            rel = os.path.relpath(path, self.folder)
            try:
                f = open(path, "rb")
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise DataError(f"webdataset_path: image folder {self.folder}: {rel} was removed since the "
                                    f"folder was listed; do not edit a dataset folder during a run") from None
                # the real reason (permissions, I/O error, a folder where the file was): not an edit
                raise DataError(f"webdataset_path: image folder {self.folder}: cannot read {rel}: "
                                f"{e.strerror or e}") from None
            now = os.fstat(f.fileno()).st_size
            if now != size:
                f.close()
                raise DataError(f"webdataset_path: image folder {self.folder}: {rel} changed size "
                                f"since the folder was listed ({size} -> {now} bytes); do not edit a "
                                f"dataset folder during a run")
            self._file, self._file_seg = f, seg
        assert self._file is not None
        return self._file

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest for ``n < 0``); b"" at the end."""
        out = []
        want = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        while want > 0:
            seg = bisect.bisect_right(self._starts, self.pos) - 1
            start = self._starts[seg]
            data, path, length = self._segs[seg]
            inner = self.pos - start
            if data is not None:
                piece = data[inner:inner + want]
            elif inner < length:
                f = self._open_file(seg, path, length)  # type: ignore[arg-type]
                f.seek(inner)
                piece = f.read(min(want, length - inner))
                if not piece:
                    raise DataError(f"webdataset_path: image folder {self.folder}: "
                                    f"{os.path.relpath(path or '', self.folder)} ended early; do not "
                                    f"edit a dataset folder during a run")
            else:   # padding after the file's data
                nxt = self._starts[seg + 1]
                piece = b"\0" * min(want, nxt - self.pos)
            out.append(piece)
            self.pos += len(piece)
            want -= len(piece)
        return b"".join(out)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._file_seg = None, -1

    def close(self) -> None:
        self._close_file()

    def __enter__(self) -> "ChunkReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_chunk(url: str, offset: int = 0) -> ChunkReader:
    """The stream of the folder chunk ``url`` positioned at byte ``offset``."""
    return ChunkReader(url, offset)
