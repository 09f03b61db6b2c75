"""Crash-safe file writes: temp file in the same folder + flush + fsync + os.replace + fsync(dir).

A reader (or a resume after kill -9) sees either the old file or the complete new one, never a
partial file. Re-exported by ``core.checkpoint``.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

__all__ = ["atomic_write_bytes", "atomic_write_with", "atomic_torch_save", "atomic_json", "fsync_dir"]


def fsync_dir(path: str) -> None:
    """fsync a folder so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_with(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temp path beside ``path``, then fsync and rename it over
    ``path``. Used for writers that want a file name (safetensors, torch.save)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave half-written temp files behind on an ordinary error or Ctrl-C.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write_with(path, write)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    # Straight to the temp file: a BytesIO copy would double the memory of a large state.
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
