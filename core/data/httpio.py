"""Shards over ``http://`` / ``https://``: a streaming reader that survives broken connections.

A plain GET (redirects followed, e.g. a dataset hub's ``resolve`` URL to its CDN). A stream that
breaks (connection reset or dropped, early end, timeout, 429 / 5xx) is reopened after a backoff
with ``Range: bytes=<pos>-`` at the byte it had reached, so no sample is lost or read twice; a
reopened response must be the same file (same ``ETag`` / ``Last-Modified`` and a ``206`` starting
at that byte; a server without Range support is read from the start and the bytes before ``pos``
skipped). 404 / 410 are a missing shard (skipped and reported like a missing file), 401 / 403
fatal.

Extra request headers (for tokens: ``{"Authorization": "Bearer hf_..."}``) come from the
environment variable :data:`HEADERS_ENV` as a JSON object. They are sent to the shard's host
only (not forwarded when a redirect leads to another host) and never logged.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from .errors import DataError, ShardMissing
from .resumable import ResumableStream

log = logging.getLogger("core.data")

#: Environment variable holding extra request headers as a JSON object.
HEADERS_ENV = "CASCADE_HTTP_HEADERS"
#: Retries of one open/read before giving up; backoff doubles from RETRY_BASE_S up to RETRY_MAX_S.
MAX_RETRIES = int(os.environ.get("CASCADE_HTTP_RETRIES", "8"))
RETRY_BASE_S = 0.25
RETRY_MAX_S = 8.0
TIMEOUT_S = 30.0

_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def env_headers() -> dict[str, str]:
    """The headers of :data:`HEADERS_ENV` (empty when unset); DataError when malformed (the
    message names the variable, never its value)."""
    raw = os.environ.get(HEADERS_ENV, "").strip()
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise DataError(f"{HEADERS_ENV} must be a JSON object of header names to string values, "
                        f'e.g. {{"Authorization": "Bearer <token>"}}')
    return doc


class _SameHostRedirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects, carrying the extra headers only to the original host."""

    def __init__(self, headers: dict[str, str]):
        self.extra = headers

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            for k in ("Range",):
                if req.has_header(k):
                    new.add_unredirected_header(k, req.get_header(k))
            if urllib.parse.urlsplit(newurl).netloc == urllib.parse.urlsplit(req.full_url).netloc:
                for k, v in self.extra.items():
                    new.add_unredirected_header(k, v)
        return new


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in _TRANSIENT_STATUS
    return isinstance(exc, (urllib.error.URLError, OSError, http.client.HTTPException, socket.timeout))


class HTTPReader(ResumableStream):
    """A read-only file object over one HTTP(S) shard starting at byte ``offset``."""

    label = "HTTP"

    def __init__(self, url: str, offset: int = 0):
        super().__init__(url, offset)
        self.validator: tuple[str | None, str | None] | None = None   # (ETag, Last-Modified)
        self._headers = env_headers()
        self._opener = urllib.request.build_opener(_SameHostRedirect(self._headers))
        self._open()

    # ------------------------------------------------------------------ opening
    def _request(self):
        req = urllib.request.Request(self.url)
        for k, v in self._headers.items():
            req.add_unredirected_header(k, v)
        if self.pos > 0:
            req.add_unredirected_header("Range", f"bytes={self.pos}-")
        try:
            return self._opener.open(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code == 416 and self.size is not None and self.pos >= self.size:
                return None   # nothing left to read
            e.close()
            raise

    def _open(self) -> None:
        if self.size is not None and self.pos >= self.size:
            self._body = None
            return
        delay = RETRY_BASE_S
        for attempt in range(MAX_RETRIES + 1):
            try:
                resp = self._request()
                self._accept(resp)
                return
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified right below
                if isinstance(exc, urllib.error.HTTPError) and exc.code in (404, 410):
                    raise ShardMissing(f"HTTP {self.url}: {exc.code} {exc.reason}") from None
                if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403):
                    raise DataError(f"HTTP {self.url}: {exc.code} {exc.reason} (check the token in "
                                    f"{HEADERS_ENV})") from None
                if not _transient(exc) or attempt == MAX_RETRIES:
                    raise DataError(f"HTTP {self.url}: open at byte {self.pos} failed after "
                                    f"{attempt + 1} attempt(s): {type(exc).__name__}: {exc}") from None
                log.warning("HTTP %s: open at byte %d failed (%s: %s); retry %d/%d in %.2fs", self.url,
                            self.pos, type(exc).__name__, exc, attempt + 1, MAX_RETRIES, delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _accept(self, resp) -> None:
        """Check a response continues this shard at ``pos``; skip to ``pos`` without Range."""
        if resp is None:
            self._body = None
            return
        validator = (resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
        if self.validator is None:
            self.validator = validator
        elif validator != self.validator and validator != (None, None):
            resp.close()
            raise DataError(f"HTTP {self.url}: the file changed on the server while it was read "
                            f"(ETag/Last-Modified differ at byte {self.pos})")
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            crange = resp.headers.get("Content-Range", "")
            try:
                span, _, total = crange.partition(" ")[2].partition("/")
                start = int(span.partition("-")[0])
            except ValueError:
                resp.close()
                raise DataError(f"HTTP {self.url}: 206 reply with a bad Content-Range {crange!r}") from None
            if start != self.pos:
                resp.close()
                raise DataError(f"HTTP {self.url}: asked for byte {self.pos}, the server sent from {start}")
            if total.isdigit():
                self.size = int(total)
            elif length is not None:
                self.size = self.pos + int(length)
        else:
            if length is not None:
                self.size = int(length)
            if self.pos > 0:
                # no Range support: read from the start and drop the bytes before pos
                log.warning("HTTP %s: the server ignores Range requests; skipping %d bytes", self.url, self.pos)
                left = self.pos
                while left > 0:
                    got = resp.read(min(left, 1 << 20))
                    if not got:
                        resp.close()
                        raise http.client.IncompleteRead(b"", left)
                    left -= len(got)
        self._body = resp

    # ------------------------------------------------------------------ reading
    def _transient(self, exc: BaseException) -> bool:
        return _transient(exc)

    def _retry_policy(self) -> tuple[int, float, float]:
        return MAX_RETRIES, RETRY_BASE_S, RETRY_MAX_S
