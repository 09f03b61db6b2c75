"""Streaming tar reading with exact byte offsets, grouped into webdataset samples.

A small reader of our own (rather than :mod:`tarfile`) because resumption needs the byte offset
of each sample's first header (including GNU long-name / pax headers) so a shard can be reopened
there, and because a cut-off stream must be told apart from a clean end of archive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

BLOCK = 512


class TarTruncated(Exception):
    """The stream ended inside a member or without the end-of-archive block."""

    def __init__(self, message: str, key: str | None):
        super().__init__(message)
        self.key = key


@dataclass
class RawSample:
    """Files of one sample (extension -> bytes) and where the sample starts in its shard."""

    key: str
    offset: int
    files: dict[str, bytes] = field(default_factory=dict)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks = []
    while n > 0:
        b = f.read(n)
        if not b:
            break
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _checksum_ok(hdr: bytes) -> bool:
    stored = _octal(hdr[148:156])
    total = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    return stored == total


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (records are '<len> key=value\\n')."""
    pos, path = 0, None
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        record = data[sp + 1:pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "replace")
        pos += length
    return path


def iter_members(f: BinaryIO, start: int = 0) -> Iterator[tuple[int, str, bytes]]:
    """Yield (offset of the member's first header, name, data) for regular files.

    ``start`` is the byte offset ``f`` is positioned at (offsets are absolute in the shard).
    Raises TarTruncated when the stream stops early or a header is damaged.
    """
    pos = start
    long_name: str | None = None
    member_start: int | None = None
    while True:
        hdr = _read_exact(f, BLOCK)
        if not hdr:
            raise TarTruncated(f"stream ended at byte {pos} without the end-of-archive block", None)
        if len(hdr) < BLOCK:
            raise TarTruncated(f"stream ended inside a header at byte {pos}", None)
        if member_start is None:
            member_start = pos
        pos += BLOCK
        if hdr == b"\0" * BLOCK:
            return
        if not _checksum_ok(hdr):
            raise TarTruncated(f"damaged tar header at byte {pos - BLOCK}", None)
        size = _octal(hdr[124:136])
        kind = hdr[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read_exact(f, padded)
        if len(data) < padded:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            raise TarTruncated(f"stream ended inside member {name!r} (byte {pos + len(data)})", name)
        pos += padded
        data = data[:size]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind in (b"x", b"g"):
            if kind == b"x":
                long_name = _pax_path(data) or long_name
            continue
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = prefix + "/" + name
        if long_name is not None:
            name = long_name
        first, member_start, long_name = member_start, None, None
        if kind in (b"0", b"\0", b"7"):
            yield first, name, data


def split_name(name: str) -> tuple[str, str] | None:
    """webdataset naming: key = path up to the first dot of the basename, ext = the rest."""
    slash = name.rfind("/")
    base = name[slash + 1:]
    dot = base.find(".")
    if dot <= 0 or base.startswith("__"):
        return None
    return name[:slash + 1 + dot], base[dot + 1:].lower()


def iter_samples(f: BinaryIO, start: int = 0) -> Iterator[RawSample]:
    """Group consecutive members sharing a key into samples.

    On truncation the sample being read is dropped and TarTruncated (carrying its key) is raised
    after all complete samples before it have been yielded.
    """
    current: RawSample | None = None
    try:
        for offset, name, data in iter_members(f, start):
            parts = split_name(name)
            if parts is None:
                continue
            key, ext = parts
            if current is not None and key != current.key:
                yield current
                current = None
            if current is None:
                current = RawSample(key=key, offset=offset)
            current.files[ext] = data
    except TarTruncated as e:
        cut = split_name(e.key) if e.key else None
        if cut is not None and current is not None and cut[0] != current.key:
            # the cut member starts a new sample, so the one before it is complete
            yield current
            current = None
        raise TarTruncated(str(e), cut[0] if cut else (current.key if current else None)) from None
    if current is not None:
        yield current
