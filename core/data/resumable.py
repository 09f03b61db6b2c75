"""The read loop shared by the remote shard readers (S3, HTTP): a broken stream is reopened at the
byte it had reached, so a dropped connection neither loses nor repeats samples."""
from __future__ import annotations

import http.client
import logging
import time

from .errors import DataError

log = logging.getLogger("core.data")


class ResumableStream:
    """A read-only file object over one remote shard from byte ``pos`` on.

    Subclasses define ``label`` (the scheme named in messages), :meth:`_open` (open ``_body`` at
    ``pos``, with their own retries), :meth:`_transient` and :meth:`_retry_policy`; the policy is
    read at each read so a module-level setting (environment variable, test) takes effect.
    """

    label = "remote"

    def __init__(self, url: str, offset: int = 0):
        self.url = url
        self.pos = offset
        self.size: int | None = None
        self._body = None

    def _open(self) -> None:
        raise NotImplementedError

    def _transient(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def _retry_policy(self) -> tuple[int, float, float]:
        """``(max retries, first backoff s, largest backoff s)``."""
        raise NotImplementedError

    def read(self, n: int = -1) -> bytes:
        max_retries, delay, max_delay = self._retry_policy()
        attempt = 0
        while True:
            if self._body is None:
                return b""
            try:
                data = self._body.read(n if n >= 0 else None)
                if not data and self.size is not None and self.pos < self.size:
                    raise http.client.IncompleteRead(b"", self.size - self.pos)
                self.pos += len(data)
                return data
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if not self._transient(exc) or attempt >= max_retries:
                    raise DataError(f"{self.label} {self.url}: read failed at byte {self.pos}: "
                                    f"{type(exc).__name__}: {exc}") from None
                attempt += 1
                log.warning("%s %s: stream broke at byte %d (%s); reopening in %.2fs (retry %d/%d)",
                            self.label, self.url, self.pos, type(exc).__name__, delay, attempt, max_retries)
                self._close_body()
                time.sleep(delay)
                delay = min(delay * 2, max_delay)
                self._open()

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass

    def close(self) -> None:
        self._close_body()

    def __enter__(self) -> "ResumableStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
