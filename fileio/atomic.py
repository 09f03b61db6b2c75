"""Crash-safe file writes: temp file in the same folder + flush + fsync + os.replace + fsync(dir).

A reader (or a resume after kill -9) sees either the old file or the complete new one, never a
partial file. Temp files are created with mode 0666 filtered by the process umask (like any
``open(path, "w")``), so the files of a run are as readable as the user's other files. A write that
fails for an operating-system reason (disk full, read-only file system, permissions, quota, file
size limit) raises :class:`fileio.errors.WriteError` naming the file and that reason, after
removing the temp file.
"""
from __future__ import annotations

import contextlib
import errno as errno_codes
import json
import os
import re
from typing import Any, Callable, Optional

from fileio.errors import WriteError

__all__ = ["atomic_write_bytes", "atomic_write_with", "atomic_torch_save", "atomic_json", "fsync_dir",
           "os_error_of", "create_temp_beside"]

# Rust writers (safetensors) report the OS error only inside their message: "... (os error 28)".
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")


def os_error_of(exc: BaseException) -> Optional[OSError]:
    """The operating-system error behind ``exc``: ``exc`` itself, one in its cause/context chain
    (torch's zip writer raises ``RuntimeError: unexpected pos`` with the file object's OSError as
    context), or an ``(os error N)`` in a message (safetensors). None when there is none."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        if isinstance(item, OSError) and item.errno:
            return item
    for item in chain:
        match = _OS_ERROR_IN_TEXT.search(str(item))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
    return None


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


def create_temp_beside(path: str) -> str:
    """Create an empty, unique ``.NAME.XXXXXXXX.tmp`` beside ``path`` and return its path.

    Mode 0666 minus the umask (``tempfile.mkstemp`` would force 0600, and the final file keeps
    the temp file's mode). The ``.tmp`` suffix lets the next start remove leftovers of a crash."""
    folder, name = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno_codes.EEXIST, "no free temporary file name", path)


def _keep_umask_mode(tmp: str, created: os.stat_result) -> None:
    """Give ``tmp`` the mode it was created with (0666 minus the umask) when the writer replaced
    the file with its own: safetensors writes a 0600 temp file of its own and renames it over
    ``tmp``. Hard links (a file shared with another name) are left alone."""
    now = os.stat(tmp)
    if now.st_ino != created.st_ino and now.st_nlink == 1 and (now.st_mode & 0o777) != (created.st_mode & 0o777):
        os.chmod(tmp, created.st_mode & 0o777)


def atomic_write_with(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temp path beside ``path``, then fsync and rename it over
    ``path``. Used for writers that want a file name (safetensors, torch.save). An OS-level failure
    raises :class:`WriteError`; any other exception propagates unchanged. The temp file is removed
    either way."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    tmp: Optional[str] = None
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = create_temp_beside(path)
        created = os.stat(tmp)
        write(tmp)
        _keep_umask_mode(tmp, created)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        # Never leave half-written temp files behind on an ordinary error or Ctrl-C. Removing can
        # itself fail (read-only file system): the next start removes ``.tmp`` leftovers.
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, WriteError) and tmp is not None and exc.path == tmp:
            # a writer that is itself atomic failed on our temp name: name the file being written
            raise WriteError(path, exc.errno, exc.reason, exc.context) from exc
        if isinstance(exc, Exception) and not isinstance(exc, WriteError):
            cause = os_error_of(exc)
            if cause is not None:
                raise WriteError(path, cause.errno, cause.strerror) from exc
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

    def write(tmp: str) -> None:
        # Through a Python file object: torch's own file writer turns ENOSPC into "unexpected pos"
        # and loses the reason, while a Python write error stays attached as the context.
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    # Straight to the temp file: a BytesIO copy would double the memory of a large state.
    atomic_write_with(path, write)


def atomic_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
