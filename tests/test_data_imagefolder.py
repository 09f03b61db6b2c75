"""A plain folder of images + same-stem .txt/.json as a dataset (core/data/imagefolder.py): the
listing, the virtual shard stream (byte-identical to make_shards' tar), filters, caption keys,
bad-data accounting, exact resume, and a folder that changes during a run."""
from __future__ import annotations

import json
import os

import pytest

from core.data import DataConfig, DataError, build_pipeline, expand_named_sources
from core.data import imagefolder
from core.data.make_shards import make_shards
from core.data.sources import open_shard
from tests.helpers.epochs import epoch_keys
from tools.photo_shards import make_sample

N = 150   # 3 chunks of imagefolder.CHUNK_SAMPLES


def write_folder(root, n=N):
    """Samples 0..n-1 in a/ and b/c/ (``NNNN.jpg|txt|json``), plus what a folder also holds."""
    for i in range(n):
        sub = root / ("a" if i < 70 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        for ext, data in make_sample(i, 64, 80 if i % 3 else 64).items():
            (sub / f"{i:04d}.{ext}").write_bytes(data)
    (root / "README.md").write_text("not a sample")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(b"ignored")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imgfolder") / "set")


def keys_of(n=N):
    return sorted((f"a/{i:04d}" if i < 70 else f"b/c/{i:04d}") for i in range(n))


def cfg(path, **kw):
    base = dict(webdataset_path=str(path), image_size=64, num_workers=0, shuffle_buffer=8,
                multi_aspect_ratio=["1/1", "4/5", "5/4"])
    base.update(kw)
    return DataConfig(**base)


def test_chunks_are_the_shards_make_shards_writes(folder, tmp_path):
    named = expand_named_sources(str(folder))
    digest = named[0][0].rsplit("-", 1)[1]
    assert [n for _, n in named] == [f"0:#chunk-{i:05d}-of-00003-{digest}" for i in range(3)]
    assert named[0][0] == f"{folder}/#chunk-00000-of-00003-{digest}"
    # the same folder elsewhere: same names (draws and saved positions carry over)
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert [n for _, n in expand_named_sources(str(moved))] == [n for _, n in named]
    # each chunk streams exactly the tar make_shards writes for those samples (before tarfile's
    # end-of-record padding), so samples, keys and byte offsets are the tar path's
    tars, _ = make_shards(str(folder), str(tmp_path / "tars"), imagefolder.CHUNK_SAMPLES)
    for (url, _), tar in zip(named, tars):
        stream = open_shard(url).read()
        assert open(tar, "rb").read()[:len(stream)] == stream
        mid = len(stream) // 2
        assert open_shard(url, mid).read() == stream[mid:]


def test_epoch_filters_captions_and_bad_data(folder, tmp_path):
    pipe = build_pipeline(cfg(folder, num_workers=2), batch_size=4)
    got = epoch_keys(pipe, 1)[0]
    pipe.close()
    assert sorted(got) == keys_of()
    # filters on the .json and json captions, as for shards
    pipe = build_pipeline(cfg(folder, dataset_filters=[["index", "<", 20]], caption_key="json:caption"),
                          batch_size=4)
    b = next(pipe)
    assert all(json.loads(json.dumps(m))["index"] < 20 for m in b["json"])
    assert all(c.startswith("json caption") for c in b["captions"])
    pipe.close()
    # an orphan caption, an undecodable image, a multi-dot and an upper-case .JPEG name
    small = write_folder(tmp_path / "small", n=8)
    (small / "a" / "orphan.txt").write_text("no image")
    (small / "a" / "0003.jpg").write_bytes(b"not a jpeg")
    os.rename(small / "a" / "0004.jpg", small / "a" / "0004.v2.JPEG")
    os.rename(small / "a" / "0004.txt", small / "a" / "0004.v2.txt")
    os.remove(small / "a" / "0004.json")
    pipe = build_pipeline(cfg(small), batch_size=2)
    got = epoch_keys(pipe, 1)[0]
    stats = pipe.stats()
    pipe.close()
    assert "a/0004_v2" in got and "a/0003" not in got and len(got) == 7
    reasons = {(r["reason"], r["key"]) for r in stats["records"]}
    assert {("missing_image", "a/orphan"), ("undecodable_image", "a/0003")} <= reasons


def test_exact_resume(folder):
    c = cfg(folder, num_workers=2)
    pipe = build_pipeline(c, batch_size=4)
    straight = [next(pipe)["keys"] for _ in range(14)]
    pipe.close()
    pipe = build_pipeline(c, batch_size=4)
    first = [next(pipe)["keys"] for _ in range(9)]
    state = json.loads(json.dumps(pipe.state_dict()))
    pipe.close()
    pipe = build_pipeline(c, batch_size=4, state=state)
    rest = [next(pipe)["keys"] for _ in range(5)]
    pipe.close()
    assert first + rest == straight


def test_refusals(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(DataError, match="holds no .tar shards and no images"):
        expand_named_sources(str(tmp_path / "empty"))
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "a.b.jpg").write_bytes(b"1")
    (clash / "a_b.jpg").write_bytes(b"2")
    with pytest.raises(DataError, match=r"a.b.jpg and .*a_b.jpg both give sample 'a_b' a .jpg file"):
        expand_named_sources(str(clash))
    # a linked sub-folder is read, a link back up the tree does not loop
    linked = write_folder(tmp_path / "linked", n=3)
    os.symlink(linked / "a", linked / "again")
    os.symlink(linked, linked / "a" / "up")
    got = imagefolder.list_folder(str(linked))
    assert [k for k, _ in got.samples] == ["a/0000", "a/0001", "a/0002",
                                           "again/0000", "again/0001", "again/0002"]
    # edited during a run: a file that changed size, a folder that gained a sample
    edit = write_folder(tmp_path / "edit", n=4)
    (url, _), = expand_named_sources(str(edit))
    (edit / "a" / "0001.txt").write_text("a longer caption than before, by far")
    with pytest.raises(DataError, match=r"0001.txt changed size since the folder was listed"):
        open_shard(url).read()
    imagefolder._cache.clear()   # as in a fresh worker process
    with pytest.raises(DataError, match="changed since the run started"):
        open_shard(url)
