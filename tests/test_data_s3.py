"""S3 through boto3 against a real moto server on 127.0.0.1 (HTTP)."""
import logging

import pytest

from core.data import DataConfig, DataError, build_pipeline, expand_sources
from core.data import s3 as s3mod
from tools.photo_shards import make_sample, write_photo_shards
from tests.helpers.data_s3server import FlakyProxy, MotoS3

BUCKET = "train-data"
N, SHARD = 60, 6


@pytest.fixture(scope="module")
def moto():
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, moto):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)


@pytest.fixture(scope="module")
def uploaded(moto, tmp_path_factory):
    d = tmp_path_factory.mktemp("s3src")
    paths = write_photo_shards(str(d), N, SHARD, sizes=[(96, 128), (128, 96), (96, 96)])
    moto.create_bucket(BUCKET)
    urls = []
    for p in paths:
        key = "sets/photos/" + p.rsplit("/", 1)[1]
        with open(p, "rb") as f:
            moto.put(BUCKET, key, f.read())
        urls.append(f"s3://{BUCKET}/{key}")
    moto.put(BUCKET, "sets/photos/README.md", b"not a shard")
    moto.put(BUCKET, "sets/other/x.tar", b"")
    return urls


def cfg(path, **kw):
    base = dict(webdataset_path=path, image_size=64, num_workers=0, shuffle_buffer=8)
    base.update(kw)
    return DataConfig(**base)


def epoch_keys(pipe):
    """Keys of the samples read in epoch 0 (tests/helpers/epochs.py)."""
    from tests.helpers.epochs import epoch_keys as by_epoch

    return by_epoch(pipe, 1)[0]


def test_listing_paginated(uploaded, monkeypatch):
    monkeypatch.setattr(s3mod, "LIST_PAGE_SIZE", 2)  # force several pages
    assert expand_sources(f"s3://{BUCKET}/sets/photos/") == uploaded
    assert expand_sources([f"s3://{BUCKET}/sets/photos/shard-{{0001..0002}}.tar"]) == uploaded[1:3]
    with pytest.raises(DataError, match=f"no .tar objects under s3://{BUCKET}/nothing/"):
        expand_sources(f"s3://{BUCKET}/nothing/")
    # a shard's name within its source is the local one's (per-sample draws agree with a local copy)
    from core.data import expand_named_sources
    names = [f"0:shard-{i:04d}.tar" for i in range(len(uploaded))]
    for listing in (f"s3://{BUCKET}/sets/photos/", f"s3://{BUCKET}/sets/photos"):
        assert expand_named_sources(listing) == list(zip(uploaded, names))
    assert [n for _, n in expand_named_sources(f"s3://{BUCKET}/sets/photos/shard-{{0001..0002}}.tar")] == names[1:3]
    assert [n for _, n in expand_named_sources(uploaded[2])] == names[2:3]


def test_streaming_epoch_with_workers(uploaded):
    pipe = build_pipeline(cfg(f"s3://{BUCKET}/sets/photos/", num_workers=2,
                              multi_aspect_ratio=["1/1", "3/4"]), batch_size=4)
    keys = epoch_keys(pipe)
    pipe.close()
    assert sorted(keys) == [f"{i:06d}" for i in range(N)]


def test_missing_bucket_is_a_clear_error():
    with pytest.raises(DataError, match="s3://no-such-bucket/x/.*NoSuchBucket"):
        expand_sources("s3://no-such-bucket/x/")
    pipe = build_pipeline(cfg(["s3://no-such-bucket/a.tar"]), batch_size=2)
    with pytest.raises(DataError, match="s3://no-such-bucket/a.tar.*NoSuchBucket"):
        next(pipe)
    pipe.close()


def test_missing_key(uploaded):
    missing = f"s3://{BUCKET}/sets/photos/missing.tar"
    pipe = build_pipeline(cfg([missing] + uploaded[:2], strict=True), batch_size=2)
    with pytest.raises(DataError, match=f"{missing}.*NoSuchKey"):
        for _ in range(20):
            next(pipe)
    pipe.close()
    # not strict: skipped and reported with its URL, the other shards are read
    pipe = build_pipeline(cfg([missing] + uploaded[:2]), batch_size=2)
    assert len(epoch_keys(pipe)) == 2 * SHARD
    recs = pipe.stats()["records"]
    assert any(r["reason"] == "missing_shard" and r["url"] == missing for r in recs)
    pipe.close()


def test_error_classification_no_retry_on_denied(monkeypatch):
    """AccessDenied/NoSuchKey fail at once (moto does not enforce auth); 5xx/throttling retry."""
    from botocore.exceptions import ClientError, EndpointConnectionError
    monkeypatch.setattr(s3mod, "RETRY_BASE_S", 0.001)
    url = "s3://b/k.tar"

    def raiser(code, status):
        calls = []

        def fn():
            calls.append(1)
            raise ClientError({"Error": {"Code": code, "Message": "m"},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
        return fn, calls

    fn, calls = raiser("AccessDenied", 403)
    with pytest.raises(DataError, match=r"S3 s3://b/k.tar: AccessDenied"):
        s3mod.with_retries(url, "open", fn)
    assert len(calls) == 1
    fn, calls = raiser("SlowDown", 503)
    with pytest.raises(DataError, match="failed after"):
        s3mod.with_retries(url, "open", fn)
    assert len(calls) == s3mod.MAX_RETRIES + 1
    flaky = iter([EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), None])

    def sometimes():
        e = next(flaky)
        if e:
            raise e
        return "ok"
    assert s3mod.with_retries(url, "open", sometimes) == "ok"


@pytest.mark.parametrize("workers", [0, 1])
def test_server_restart_mid_epoch(uploaded, moto, monkeypatch, caplog, workers):
    """The server restarts while shards are streaming: reads resume by Range, nothing lost or repeated."""
    total = sum(1 for _ in uploaded)
    monkeypatch.setattr(s3mod, "MAX_RETRIES", 5)  # bounded (~8 s) if something goes wrong
    proxy = FlakyProxy(moto, cut_after=120_000, outage_s=1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        with caplog.at_level(logging.WARNING, logger="core.data"):
            pipe = build_pipeline(cfg(uploaded, num_workers=workers, shuffle_buffer=4), batch_size=3)
            keys = epoch_keys(pipe)
            pipe.close()
    finally:
        proxy.close()
    assert proxy.outages == 1 and total == N // SHARD
    assert len(keys) == N and sorted(keys) == [f"{i:06d}" for i in range(N)]
    assert any(b"Range: bytes=" in r or b"range: bytes=" in r for r in proxy.requests)
    if workers == 0:
        assert "reopening" in caplog.text or "retry" in caplog.text


def test_reopen_refuses_a_replaced_object(moto, uploaded):
    moto.put(BUCKET, "tmp/replaced.tar", b"a" * 5000)
    r = s3mod.S3Reader(f"s3://{BUCKET}/tmp/replaced.tar")
    assert r.read(1000) == b"a" * 1000
    moto.put(BUCKET, "tmp/replaced.tar", b"b" * 5000)
    r._close_body()
    with pytest.raises(DataError, match="replaced.tar.*PreconditionFailed"):
        r._open()  # what a retry does after a broken stream
    r2 = s3mod.S3Reader(f"s3://{BUCKET}/tmp/replaced.tar", offset=4990)
    assert r2.read() == b"b" * 10 and r2.read() == b""
