"""S3 access through boto3: listing, and a streaming reader that survives server hiccups.

Endpoint and credentials come from boto3's standard chain (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/..., ``~/.aws/config``). A reader resumes a broken stream with a Range GET at
the byte it had reached, so a restart of the server mid-shard neither loses nor repeats samples.
"""
from __future__ import annotations

import http.client
import logging
import os
import threading
import time
from typing import Callable

from .errors import DataError, ShardMissing
from .resumable import ResumableStream

log = logging.getLogger("core.data")

#: Retries of one read/open before giving up; backoff doubles from RETRY_BASE_S up to RETRY_MAX_S.
MAX_RETRIES = int(os.environ.get("CASCADE_S3_RETRIES", "8"))
RETRY_BASE_S = 0.25
RETRY_MAX_S = 8.0

_FATAL_CODES = {"NoSuchBucket", "NoSuchKey", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
                "SignatureDoesNotMatch", "404", "403", "InvalidBucketName", "InvalidRange"}
_TRANSIENT_CODES = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout",
                    "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "503", "500"}

#: Keys per listing request (the paginator follows continuation tokens).
LIST_PAGE_SIZE = 1000

_clients: dict[tuple, object] = {}
_lock = threading.Lock()


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DataError(f"webdataset_path: {url!r} has no bucket name")
    return bucket, key


def client():
    """One boto3 S3 client per process and endpoint (clients must not cross a fork into
    DataLoader workers; the endpoint is part of the key so a changed ``AWS_ENDPOINT_URL`` is seen)."""
    pid = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    with _lock:
        c = _clients.get(pid)
        if c is None:
            import boto3
            from botocore.config import Config
            # boto3's own retries stay low: our loop below handles backoff and stream resumption
            cfg = Config(retries={"max_attempts": 2, "mode": "standard"},
                         connect_timeout=5, read_timeout=30)
            c = boto3.client("s3", config=cfg)
            _clients[pid] = c
        return c


def _classify(exc: BaseException) -> str:
    """'fatal', 'transient' or 'other' for an exception raised by boto3 / the HTTP stack."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    if isinstance(exc, NoCredentialsError):
        return "fatal"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        if code in _FATAL_CODES or status in (401, 403, 404):
            return "fatal"
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return "transient"
        return "fatal"
    try:
        import urllib3
        if isinstance(exc, urllib3.exceptions.HTTPError):
            return "transient"
    except ImportError:  # pragma: no cover - urllib3 ships with botocore
        pass
    if isinstance(exc, (BotoCoreError, OSError, http.client.HTTPException)):
        return "transient"
    return "other"


def _fatal_error(url: str, exc: BaseException) -> DataError:
    from botocore.exceptions import ClientError
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "?")
        hint = {"NoSuchBucket": "the bucket does not exist", "NoSuchKey": "no such object",
                "404": "no such object", "AccessDenied": "access denied (check credentials/policy)",
                "403": "access denied (check credentials/policy)"}.get(str(code), err.get("Message", ""))
        cls = ShardMissing if str(code) in ("NoSuchKey", "404") else DataError
        return cls(f"S3 {url}: {code}: {hint}")
    return DataError(f"S3 {url}: {exc}")


def with_retries(url: str, what: str, fn: Callable[[], object]) -> object:
    """Call ``fn`` retrying transient failures with exponential backoff."""
    delay = RETRY_BASE_S
    for attempt in range(MAX_RETRIES + 1):
        try:
            return fn()
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified right below
            kind = _classify(exc)
            if kind == "fatal":
                raise _fatal_error(url, exc) from None
            if kind == "other" or attempt == MAX_RETRIES:
                raise DataError(f"S3 {url}: {what} failed after {attempt + 1} attempts: "
                                f"{type(exc).__name__}: {exc}") from None
            log.warning("S3 %s: %s failed (%s: %s); retry %d/%d in %.2fs", url, what,
                        type(exc).__name__, exc, attempt + 1, MAX_RETRIES, delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
    raise AssertionError("unreachable")


def list_tars(url: str) -> list[str]:
    """All ``.tar`` objects under an ``s3://bucket/prefix`` (paginated), sorted by key."""
    bucket, prefix = split_url(url)

    def run() -> list[str]:
        keys = []
        pages = client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE})
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(".tar"):
                    keys.append(obj["Key"])
        return sorted(keys)

    keys = with_retries(url, "listing", run)
    return [f"s3://{bucket}/{k}" for k in keys]  # type: ignore[union-attr]


class S3Reader(ResumableStream):
    """A read-only file object over one S3 object starting at ``offset``.

    Broken or stalled streams (connection reset, 5xx, throttling, early EOF) are reopened with
    ``Range: bytes=<pos>-`` after a backoff; missing bucket/key and denied access raise DataError.
    """

    label = "S3"

    def __init__(self, url: str, offset: int = 0):
        super().__init__(url, offset)
        self.bucket, self.key = split_url(url)
        self.etag: str | None = None
        self._open()

    def _open(self) -> None:
        def run():
            kwargs = {"Bucket": self.bucket, "Key": self.key}
            if self.pos > 0:
                kwargs["Range"] = f"bytes={self.pos}-"
            if self.etag:
                # a reopened stream must continue the same object version, not a replaced one
                kwargs["IfMatch"] = self.etag
            return client().get_object(**kwargs)

        if self.size is not None and self.pos >= self.size:
            self._body = None
            return
        resp = with_retries(self.url, "open", run)
        self._body = resp["Body"]  # type: ignore[index]
        self.etag = self.etag or resp.get("ETag")  # type: ignore[union-attr]
        length = resp.get("ContentLength")  # type: ignore[union-attr]
        if length is not None:
            self.size = self.pos + int(length)

    def _transient(self, exc: BaseException) -> bool:
        return _classify(exc) == "transient"

    def _retry_policy(self) -> tuple[int, float, float]:
        return MAX_RETRIES, RETRY_BASE_S, RETRY_MAX_S
