"""Bad data: undecodable JPEG, caption-less sample, truncated tar, missing shard."""
import logging
import os

import pytest

from core.data import DataConfig, DataError, build_pipeline
from tests.helpers.epochs import epoch_keys
from tools.photo_shards import make_sample, write_tar


@pytest.fixture(scope="module")
def corrupt_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrupt")
    # shard a: 5 good samples, one whose JPEG body is cut (header fine, decode fails), one
    # without a caption, one without an image
    a = []
    for i in range(8):
        files = make_sample(i, 96, 128)
        if i == 2:
            files["jpg"] = files["jpg"][: len(files["jpg"]) // 2]
        if i == 5:
            del files["txt"]
        if i == 6:
            del files["jpg"]
        a.append((f"{i:06d}", files))
    a_path = write_tar(str(d / "a.tar"), a)
    # shard b: 8 samples, cut in the middle of sample 5's image
    b = [(f"{i:06d}", make_sample(i, 96, 96)) for i in range(100, 108)]
    b_path = write_tar(str(d / "b.tar"), b)
    full = write_tar(str(d / "probe.tar"), b[:5])  # size of samples 100..104 (+ end blocks)
    cut = os.path.getsize(full) - 1024 + 700
    os.remove(full)
    with open(b_path, "r+b") as f:
        f.truncate(cut)
    c_path = str(d / "c.tar")  # missing
    good = [f"{i:06d}" for i in range(8) if i not in (2, 5, 6)] + [f"{i:06d}" for i in range(100, 105)]
    return [a_path, b_path, c_path], good


@pytest.fixture(scope="module")
def good_shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return write_tar(str(d / "g.tar"), [(f"g{i}", make_sample(i, 64, 64)) for i in range(4)])


def cfg(paths, **kw):
    return DataConfig(webdataset_path=paths, image_size=64, num_workers=0, shuffle_buffer=4, **kw)


def test_exactly_the_good_samples_and_reports(corrupt_set, caplog):
    paths, good = corrupt_set
    a, b, c = paths
    pipe = build_pipeline(cfg(paths, report_every=2), batch_size=3)
    with caplog.at_level(logging.INFO, logger="core.data"):
        keys = epoch_keys(pipe, 1)[0]
    assert "samples emitted" in caplog.text  # periodic summary every report_every batches
    assert sorted(keys) == sorted(good)
    st = pipe.stats()
    assert st["bad"]["undecodable_image"] >= 1 and st["bad"]["missing_caption"] >= 1
    assert st["bad"]["truncated_tar"] >= 1 and st["bad"]["missing_shard"] >= 1
    recs = {(r["reason"], r["url"], r["key"]) for r in st["records"]}
    assert ("undecodable_image", a, "000002") in recs
    assert ("missing_caption", a, "000005") in recs
    assert ("missing_image", a, "000006") in recs
    assert ("truncated_tar", b, "000105") in recs
    assert ("missing_shard", c, None) in recs
    with caplog.at_level(logging.INFO, logger="core.data"):
        pipe.close()
    text = caplog.text
    for url in (a, b, c):
        assert url in text
    assert "missing_caption" in text and "truncated_tar" in text


@pytest.mark.parametrize("which,reason", [(0, "undecodable_image|missing_caption"),
                                          (1, "truncated_tar"), (2, "missing_shard")])
def test_strict_raises_with_url(corrupt_set, good_shard, which, reason):
    paths, _ = corrupt_set
    pipe = build_pipeline(cfg([paths[which], good_shard], strict=True), batch_size=2)
    with pytest.raises(DataError, match=reason) as e:
        for _ in range(20):
            next(pipe)
    assert paths[which] in str(e.value)
    pipe.close()


def test_strict_raises_from_worker_process(corrupt_set, good_shard):
    paths, _ = corrupt_set
    pipe = build_pipeline(DataConfig(webdataset_path=[paths[2], good_shard], image_size=64,
                                     num_workers=2, strict=True), batch_size=2)
    with pytest.raises(DataError, match="missing_shard"):
        for _ in range(20):
            next(pipe)
    pipe.close()


def test_all_bad_raises_instead_of_hanging(corrupt_set, tmp_path):
    paths, _ = corrupt_set
    junk = str(tmp_path / "junk.tar")
    write_tar(junk, [(f"{i:03d}", {"jpg": b"not a jpeg", "txt": b"x"}) for i in range(5)])
    pipe = build_pipeline(cfg([junk, paths[2]]), batch_size=2)
    with pytest.raises(DataError, match="no sample survived") as e:
        next(pipe)
    assert "undecodable_image" in str(e.value)
    pipe.close()
