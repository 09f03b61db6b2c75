"""Turn ``webdataset_path`` into the ordered list of shard URLs, and open a shard at an offset.

Every shard also gets a *name*: its identity within the dataset, independent of where the files
are mounted. The name is ``"<entry>:<relative path>"``: ``entry`` is the position of the source
entry that produced the shard (counting the leaf entries of ``.yml`` lists in order) and the
relative path is the URL with the entry's fixed *base* cut off:

* a directory (local, or an ``s3://bucket/prefix/`` listing): the directory / prefix itself,
  so ``/data/set/x.tar`` under ``/data/set`` and ``s3://b/set/x.tar`` under ``s3://b/set/`` are
  both ``0:x.tar``;
* a pattern (braces ``{..}`` or a glob ``* ? [``): the folder of the text before the first
  pattern character (``/data/{a,b}/x.tar`` gives ``0:a/x.tar``);
* a single shard: its folder (``0:x.tar``).

``http://`` / ``https://`` URLs are shards as given (no listing over HTTP; brace patterns work,
globs do not), read by :mod:`.httpio`; their base is the URL up to the last ``/`` before the
first ``{`` (or the shard's own folder). A local directory without ``.tar`` files but with
images is an image folder (:mod:`.imagefolder`): its shards are chunks of its sorted samples,
named ``<entry>:#chunk-...`` (``<entry>:a/#chunk-...`` below a pattern base).

Names are hashed into the per-sample random draws and the resume fingerprint, so moving a
dataset (or switching it between a local copy and S3) changes neither.
"""
from __future__ import annotations

import glob
import os
import re
from typing import BinaryIO

import braceexpand

from .errors import DataError

_MAX_YAML_DEPTH = 4


def _is_s3(url: str) -> bool:
    return url.startswith("s3://")


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _is_remote(url: str) -> bool:
    return _is_s3(url) or _is_http(url)


_PATTERN_CHARS = "{*?["


def _relative(url: str, base: str) -> str:
    """``url`` below ``base`` (both absolute local paths, or both s3:// / http(s):// URLs)."""
    if _is_remote(url):
        return url[len(base):].lstrip("/")   # every listed / expanded URL starts with its base
    return os.path.relpath(url, base)


def _pattern_base(entry: str) -> str | None:
    """The fixed folder in front of the first pattern character of ``entry``, or None if the
    entry has no pattern."""
    if _is_http(entry):
        # '?' and '*' are ordinary URL characters (query strings); only braces are patterns
        cut = entry.find("{")
        return None if cut < 0 else entry[:entry.rfind("/", 0, cut) + 1]
    cut = min((i for i in (entry.find(c) for c in _PATTERN_CHARS) if i >= 0), default=-1)
    if cut < 0:
        return None
    head = entry[:cut]
    if _is_s3(head):
        return head[:head.rfind("/") + 1]
    path = os.path.abspath(os.path.expanduser(head))
    # "/data/set/" is the folder itself; "/data/set/shard-" lies in /data/set
    return path if head.endswith("/") else os.path.dirname(path)


def _expand_entry(entry: str, depth: int, position: list[int] | None = None) -> list[tuple[str, str]]:
    """``(url, name)`` of every shard of one configured entry (see the module docstring).
    ``position`` is the running count of leaf entries, shared by nested ``.yml`` lists."""
    position = [0] if position is None else position
    entry = entry.strip()
    if entry.startswith("pipe:"):
        raise DataError(f"webdataset_path: {entry!r}: shell pipes are not supported; give s3:// "
                        f"URLs (read through boto3) or local paths")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", entry)
    if scheme and scheme.group(1).lower() not in ("file", "s3", "http", "https"):
        raise DataError(f"webdataset_path: {entry!r}: unsupported URL scheme '{scheme.group(1)}://'; give local "
                        f"paths, s3:// or http(s):// URLs")
    if entry.startswith("file://"):
        entry = entry[len("file://"):]
    elif entry.startswith("file:"):
        entry = entry[len("file:"):]
    if entry.lower().endswith((".yml", ".yaml")) and not _is_remote(entry):
        return _expand_yaml(entry, depth, position)
    index = position[0]
    position[0] += 1
    pattern_base = _pattern_base(entry)
    out: list[tuple[str, str]] = []

    def add(urls: list[str], base: str) -> None:
        base = pattern_base if pattern_base is not None else base
        out.extend((u, f"{index}:{_relative(u, base)}") for u in urls)

    for item in braceexpand.braceexpand(entry):
        if _is_http(item):
            if item.endswith("/"):
                raise DataError(f"webdataset_path: {item}: an HTTP folder cannot be listed; give the "
                                f"shard URLs (a brace pattern such as .../shard-{{0000..0099}}.tar)")
            add([item], item[:item.rfind("/") + 1])
            continue
        if _is_s3(item):
            if item.endswith(".tar"):
                add([item], item[:item.rfind("/") + 1])
            else:
                from .s3 import list_tars
                found = list_tars(item)
                if not found:
                    raise DataError(f"webdataset_path: no .tar objects under {item}")
                add(found, item)  # a listing is a folder: its prefix is the base
            continue
        path = os.path.abspath(os.path.expanduser(item))
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            if not found:
                # no shards: a plain folder of images + same-stem captions (DataError if none)
                from .imagefolder import chunk_urls
                found = chunk_urls(path)
            add(found, path)
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(path))
            if not found:
                raise DataError(f"webdataset_path: pattern {item!r} matches no file")
            add(found, os.path.dirname(path))
        else:
            # A missing single shard is not fatal here: it is skipped and reported while reading,
            # like a shard that disappears mid-run.
            add([path], os.path.dirname(path))
    return out


def _expand_yaml(path: str, depth: int, position: list[int]) -> list[tuple[str, str]]:
    import yaml
    if depth >= _MAX_YAML_DEPTH:
        raise DataError(f"webdataset_path: {path}: .yml lists nested too deeply")
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise DataError(f"webdataset_path: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise DataError(f"webdataset_path: {path} is not valid YAML: {e}") from None
    if isinstance(doc, str):
        doc = [doc]
    if not isinstance(doc, list) or not all(isinstance(x, str) for x in doc):
        raise DataError(f"webdataset_path: {path} must hold a YAML list of paths/URLs")
    out: list[tuple[str, str]] = []
    for x in doc:
        out.extend(_expand_entry(x, depth + 1, position))
    return out


def expand_sources(webdataset_path: str | list[str]) -> list[str]:
    """All shard URLs, in configuration order; DataError if nothing usable is found."""
    return [url for url, _name in expand_named_sources(webdataset_path)]


def expand_named_sources(webdataset_path: str | list[str]) -> list[tuple[str, str]]:
    """``(url, name)`` of every shard, in configuration order: ``name`` is the shard's identity
    within the dataset (module docstring), the same wherever the files are mounted. DataError
    if nothing usable is found."""
    entries = [webdataset_path] if isinstance(webdataset_path, str) else list(webdataset_path)
    named: list[tuple[str, str]] = []
    position = [0]
    for e in entries:
        named.extend(_expand_entry(e, 0, position))
    urls = [u for u, _ in named]
    if not urls:
        raise DataError(f"webdataset_path: {webdataset_path!r} names no shards")
    from .imagefolder import is_chunk_url
    if not any(_is_remote(u) or is_chunk_url(u) or os.path.exists(u) for u in urls):
        raise DataError(f"webdataset_path: none of the {len(urls)} shard(s) exists "
                        f"(first: {urls[0]})")
    return named


def open_shard(url: str, offset: int = 0) -> BinaryIO:
    """Open a shard for streaming, positioned at byte ``offset``.

    Raises FileNotFoundError for a missing local shard (the caller skips and reports it),
    ShardMissing for a missing S3 / HTTP shard and DataError for errors that retrying cannot fix.
    """
    if _is_http(url):
        from .httpio import HTTPReader
        return HTTPReader(url, offset)  # type: ignore[return-value]
    from .imagefolder import is_chunk_url, open_chunk
    if is_chunk_url(url):
        return open_chunk(url, offset)  # type: ignore[return-value]
    if _is_s3(url):
        from .s3 import S3Reader
        return S3Reader(url, offset)  # type: ignore[return-value]
    f = open(url, "rb", buffering=1 << 20)
    if offset:
        f.seek(offset)
    return f
