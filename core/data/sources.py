"""Turn ``webdataset_path`` into the ordered list of shard URLs, and open a shard at an offset."""
from __future__ import annotations

import glob
import os
from typing import BinaryIO

import braceexpand

from .errors import DataError

_MAX_YAML_DEPTH = 4


def _is_s3(url: str) -> bool:
    return url.startswith("s3://")


def _expand_entry(entry: str, depth: int) -> list[str]:
    entry = entry.strip()
    if entry.startswith("pipe:"):
        raise DataError(f"webdataset_path: {entry!r}: shell pipes are not supported; give s3:// "
                        f"URLs (read through boto3) or local paths")
    if entry.startswith("file://"):
        entry = entry[len("file://"):]
    elif entry.startswith("file:"):
        entry = entry[len("file:"):]
    if entry.lower().endswith((".yml", ".yaml")) and not _is_s3(entry):
        return _expand_yaml(entry, depth)
    urls: list[str] = []
    for item in braceexpand.braceexpand(entry):
        if _is_s3(item):
            if item.endswith(".tar"):
                urls.append(item)
            else:
                from .s3 import list_tars
                found = list_tars(item)
                if not found:
                    raise DataError(f"webdataset_path: no .tar objects under {item}")
                urls.extend(found)
            continue
        path = os.path.abspath(os.path.expanduser(item))
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            if not found:
                raise DataError(f"webdataset_path: directory {path} holds no .tar shards")
            urls.extend(found)
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(path))
            if not found:
                raise DataError(f"webdataset_path: pattern {item!r} matches no file")
            urls.extend(found)
        else:
            # A missing single shard is not fatal here: it is skipped and reported while reading,
            # like a shard that disappears mid-run.
            urls.append(path)
    return urls


def _expand_yaml(path: str, depth: int) -> list[str]:
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
    out: list[str] = []
    for x in doc:
        out.extend(_expand_entry(x, depth + 1))
    return out


def expand_sources(webdataset_path: str | list[str]) -> list[str]:
    """All shard URLs, in configuration order; DataError if nothing usable is found."""
    entries = [webdataset_path] if isinstance(webdataset_path, str) else list(webdataset_path)
    urls: list[str] = []
    for e in entries:
        urls.extend(_expand_entry(e, 0))
    if not urls:
        raise DataError(f"webdataset_path: {webdataset_path!r} names no shards")
    if not any(_is_s3(u) or os.path.exists(u) for u in urls):
        raise DataError(f"webdataset_path: none of the {len(urls)} shard(s) exists "
                        f"(first: {urls[0]})")
    return urls


def open_shard(url: str, offset: int = 0) -> BinaryIO:
    """Open a shard for streaming, positioned at byte ``offset``.

    Raises FileNotFoundError for a missing local shard (the caller skips and reports it) and
    DataError for S3 errors that retrying cannot fix.
    """
    if _is_s3(url):
        from .s3 import S3Reader
        return S3Reader(url, offset)  # type: ignore[return-value]
    f = open(url, "rb", buffering=1 << 20)
    if offset:
        f.seek(offset)
    return f
