"""Shards over http:// against a real HTTP server on 127.0.0.1 (tests/helpers/http_server.py):
names and brace patterns, Range resume after a dropped connection, servers without Range,
missing / denied shards, headers from CASCADE_HTTP_HEADERS, exact resume of the pipeline."""
from __future__ import annotations

import json
import logging
import os

import pytest

from core.data import DataConfig, DataError, build_pipeline, expand_named_sources
from core.data import httpio
from core.data.errors import ShardMissing
from tests.helpers.epochs import epoch_keys
from tests.helpers.http_server import FileServer
from tools.photo_shards import write_photo_shards

N, SHARD = 24, 6


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("httpsrc")
    write_photo_shards(str(d), N, SHARD, sizes=[(64, 80), (80, 64), (64, 64)])
    return d


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(httpio, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(httpio, "MAX_RETRIES", 4)
    monkeypatch.delenv(httpio.HEADERS_ENV, raising=False)


def cfg(path, **kw):
    base = dict(webdataset_path=path, image_size=64, num_workers=0, shuffle_buffer=4,
                multi_aspect_ratio=["1/1", "4/5", "5/4"])
    base.update(kw)
    return DataConfig(**base)


def pattern(server) -> str:
    return f"{server.url}/shard-{{0000..{N // SHARD - 1:04d}}}.tar"


def test_names_of_url_patterns_match_the_local_copy(shard_dir):
    local = [n for _, n in expand_named_sources(str(shard_dir))]
    urls = expand_named_sources("https://host.example/datasets/x/resolve/main/shard-{0000..0003}.tar")
    assert [n for _, n in urls] == local == [f"0:shard-{i:04d}.tar" for i in range(4)]
    assert urls[1][0] == "https://host.example/datasets/x/resolve/main/shard-0001.tar"
    single = expand_named_sources("https://host.example/a/b.tar?download=true")
    assert single == [("https://host.example/a/b.tar?download=true", "0:b.tar?download=true")]
    with pytest.raises(DataError, match="HTTP folder cannot be listed"):
        expand_named_sources("http://host.example/shards/")


def test_reader_resumes_a_dropped_stream_by_range(shard_dir, caplog):
    data = (shard_dir / "shard-0001.tar").read_bytes()
    with FileServer(str(shard_dir), drop_after=7000, drops=2) as server:
        with caplog.at_level(logging.WARNING, logger="core.data"):
            r = httpio.HTTPReader(f"{server.url}/shard-0001.tar")
            got = b"".join(iter(lambda: r.read(4096), b""))
        assert got == data and server.dropped == 2
        assert [h.get("Range") for _, h in server.requests] == [None, "bytes=7000-", "bytes=14000-"]
        assert "stream broke at byte 7000" in caplog.text
        # opened at an offset: a Range request from there
        r = httpio.HTTPReader(f"{server.url}/shard-0001.tar", offset=5000)
        assert r.read() == data[5000:] and r.read() == b""
    with FileServer(str(shard_dir), no_range=True) as server:   # Range ignored: skip ahead
        assert httpio.HTTPReader(f"{server.url}/shard-0001.tar", offset=5000).read() == data[5000:]


def test_missing_denied_and_headers(shard_dir, monkeypatch):
    with FileServer(str(shard_dir), require=("Authorization", "Bearer s3cr3t")) as server:
        with pytest.raises(DataError, match=f"{server.url}/shard-0000.tar: 401 .*CASCADE_HTTP_HEADERS"):
            httpio.HTTPReader(f"{server.url}/shard-0000.tar")
        monkeypatch.setenv(httpio.HEADERS_ENV, json.dumps({"Authorization": "Bearer s3cr3t"}))
        data = (shard_dir / "shard-0000.tar").read_bytes()
        assert httpio.HTTPReader(f"{server.url}/shard-0000.tar").read() == data
        # a same-host redirect keeps the header
        assert httpio.HTTPReader(f"{server.url}/redirect/shard-0000.tar").read() == data
        # ... a redirect to another host does not carry it
        server.requests.clear()
        with pytest.raises(DataError, match="401"):
            httpio.HTTPReader(f"{server.url}/redirect-host/shard-0000.tar")
        assert [h.get("Authorization") for _, h in server.requests] == ["Bearer s3cr3t", None]
        with pytest.raises(ShardMissing, match="404"):
            httpio.HTTPReader(f"{server.url}/nope.tar")
    monkeypatch.setenv(httpio.HEADERS_ENV, "Authorization: Bearer s3cr3t")
    with pytest.raises(DataError, match="CASCADE_HTTP_HEADERS must be a JSON object") as e:
        httpio.env_headers()
    assert "s3cr3t" not in str(e.value)


def test_pipeline_over_http_equals_local_and_survives_drops(shard_dir):
    local = build_pipeline(cfg(str(shard_dir)), batch_size=3)
    want = epoch_keys(local, 1)[0]
    local.close()
    with FileServer(str(shard_dir), drop_after=9000, drops=3) as server:
        urls = [pattern(server), f"{server.url}/missing.tar"]
        pipe = build_pipeline(cfg(urls[:1]), batch_size=3)
        got = epoch_keys(pipe, 1)[0]
        pipe.close()
        assert server.dropped == 3
        # a missing URL is a skipped, reported shard
        pipe = build_pipeline(cfg(urls), batch_size=3)
        next(pipe)
        pipe.close()
    assert got == want and len(got) == N   # same names, same order as the local copy
    recs = pipe.stats()["records"]
    assert any(r["reason"] == "missing_shard" and r["url"].endswith("/missing.tar") for r in recs)


def test_exact_resume_over_http(shard_dir):
    with FileServer(str(shard_dir)) as server:
        c = cfg(pattern(server), num_workers=1)
        pipe = build_pipeline(c, batch_size=3)
        straight = [next(pipe)["keys"] for _ in range(6)]
        pipe.close()
        pipe = build_pipeline(c, batch_size=3)
        first = [next(pipe)["keys"] for _ in range(3)]
        state = json.loads(json.dumps(pipe.state_dict()))
        pipe.close()
        pipe = build_pipeline(c, batch_size=3, state=state)
        rest = [next(pipe)["keys"] for _ in range(3)]
        pipe.close()
        # the resumed stream opened its shard mid-file
        assert any(h.get("Range") for _, h in server.requests)
    assert first + rest == straight
    assert os.environ.get(httpio.HEADERS_ENV) is None
