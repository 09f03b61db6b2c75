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
    """The shard cannot be read past some point: the stream ended inside a member or without the
    end-of-archive block (this class), or a header is damaged (:class:`TarMalformed`).

    ``key`` is the member name (then, from :func:`iter_samples`, the sample key) at the cut, if
    known; ``offset`` the byte offset in the shard where reading stopped.
    """

    def __init__(self, message: str, key: str | None, offset: int | None = None):
        super().__init__(message)
        self.key = key
        self.offset = offset


class TarMalformed(TarTruncated):
    """A header that cannot be interpreted: bad checksum, or a numeric field that is not octal
    (a subclass of TarTruncated so that readers which stop at a cut stop here too)."""


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


_OCTAL_DIGITS = frozenset(b"01234567")


def _octal(field_bytes: bytes) -> int | None:
    """The number in a header field, or None when the field is not octal (damaged header)."""
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big")
    # NUL or space terminated; int() alone would also take '+', '_' or '0o' spellings
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not _OCTAL_DIGITS.issuperset(text):
        return None
    return int(text, 8)


def _checksum_ok(hdr: bytes) -> bool:
    stored = _octal(hdr[148:156])
    total = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    return stored == total


def _member_name(hdr: bytes) -> str:
    return hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def _pax_path(data: bytes, offset: int) -> str | None:
    """The ``path`` record of a pax extended header (records are '<len> key=value\\n').

    ``offset``: where the header starts in the shard, for the TarMalformed message.
    """
    pos, path = 0, None
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        digits = data[pos:sp]
        length = int(digits) if digits.isdigit() else 0
        if length <= sp - pos:
            raise TarMalformed(f"malformed tar header at byte {offset}: pax record length "
                               f"{digits[:20]!r} is not a valid length", None, offset)
        record = data[sp + 1:pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "replace")
        pos += length
    return path


def iter_members(f: BinaryIO, start: int = 0) -> Iterator[tuple[int, str, bytes]]:
    """Yield (offset of the member's first header, name, data) for regular files.

    ``start`` is the byte offset ``f`` is positioned at (offsets are absolute in the shard).
    Raises TarTruncated when the stream stops early, TarMalformed when a header is damaged
    (both carry the byte offset where reading stopped).
    """
    pos = start
    long_name: str | None = None
    member_start: int | None = None
    while True:
        hdr = _read_exact(f, BLOCK)
        if not hdr:
            raise TarTruncated(f"stream ended at byte {pos} without the end-of-archive block", None, pos)
        if len(hdr) < BLOCK:
            raise TarTruncated(f"stream ended inside a header at byte {pos}", None, pos)
        if member_start is None:
            member_start = pos
        pos += BLOCK
        if hdr == b"\0" * BLOCK:
            return
        here = pos - BLOCK
        if not _checksum_ok(hdr):
            # the name field of a damaged header cannot be trusted: no key
            raise TarMalformed(f"damaged tar header at byte {here} (checksum mismatch)", None, here)
        size = _octal(hdr[124:136])
        if size is None:
            # a valid checksum over a garbage size: the member's length, hence where the next
            # header starts, is unknown, so nothing after this point can be read
            raise TarMalformed(f"malformed tar header at byte {here}: size field "
                               f"{hdr[124:136]!r} is not octal", _member_name(hdr) or None, here)
        kind = hdr[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read_exact(f, padded)
        if len(data) < padded:
            name = _member_name(hdr)
            raise TarTruncated(f"stream ended inside member {name!r} (byte {pos + len(data)})", name,
                               pos + len(data))
        pos += padded
        data = data[:size]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind in (b"x", b"g"):
            if kind == b"x":
                long_name = _pax_path(data, here) or long_name
            continue
        name = _member_name(hdr)
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
        raise type(e)(str(e), cut[0] if cut else (current.key if current else None), e.offset) from None
    if current is not None:
        yield current
