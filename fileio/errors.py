"""The errors of file I/O. Both are user-fixable: ``core.errors.run_cli`` prints them as one
``error: ...`` line (it recognises ``CheckpointError`` by class name, so this package needs no
import of ``core``)."""
from __future__ import annotations

import errno as errno_codes
import os
from typing import Optional

__all__ = ["CheckpointError", "WriteError"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, cannot be written or does not fit the requested model."""


class WriteError(CheckpointError):
    """A file could not be written for an operating-system reason.

    ``path``: the file; ``errno`` / ``reason``: the OS error number and its text ("No space left
    on device", "Read-only file system", ...). The message is one line with both and a fix."""

    def __init__(self, path: str, errno: int, reason: Optional[str] = None, context: str = "") -> None:
        self.path, self.errno = path, errno
        self.reason = reason or (os.strerror(errno) if errno else "input/output error")
        self.context = context
        super().__init__(f"{context}{path}: {self.reason}; {self.hint}")

    @property
    def hint(self) -> str:
        """How to fix it, by error class."""
        if self.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT):
            return "free disk space (or raise the quota) and run the same command again"
        if self.errno == errno_codes.EFBIG:
            return "raise the file size limit (ulimit -f) and run the same command again"
        if self.errno == errno_codes.EROFS:
            return "the file system is read-only: remount it writable or choose another folder in the config"
        if self.errno in (errno_codes.EACCES, errno_codes.EPERM):
            return "fix the folder's permissions or choose another folder in the config"
        return "fix the storage and run the same command again"

    def with_context(self, context: str) -> "WriteError":
        """The same error with ``context`` (e.g. which checkpoint) before the path."""
        return WriteError(self.path, self.errno, self.reason, context)
