"""End-to-end pipeline on real photo shards: batches, captions, splitting, buckets, resume."""
import collections
import json
import os

import pytest
import torch

from core.data import DataConfig, DataError, build_pipeline, expand_sources
from tests.helpers.epochs import epoch_keys, take_samples
from tools.photo_shards import write_photo_shards

N = 96          # samples
SHARD = 8       # samples per shard -> 12 shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return write_photo_shards(str(d), N, SHARD)


def cfg(path, **kw):
    base = dict(webdataset_path=path, image_size=64, num_workers=0, shuffle_buffer=16)
    base.update(kw)
    return DataConfig(**base)


def test_fixed_size_batches(shards):
    with build_pipeline(cfg(os.path.dirname(shards[0])), batch_size=8) as pipe:
        b = next(pipe)
        assert b["images"].shape == (8, 3, 64, 64) and b["images"].dtype == torch.float32
        assert 0.0 <= b["images"].min() and b["images"].max() <= 1.0
        assert b["images"].std() > 0.05  # real photos, not flat colours
        assert all(c.startswith("a photo of ") for c in b["captions"])
        assert set(b) == {"images", "captions", "keys", "urls", "json", "sample_epochs", "epoch"}
        assert all(u in shards for u in b["urls"])
        assert all(isinstance(j, dict) and j["index"] == int(k) for j, k in zip(b["json"], b["keys"]))
        assert b["epoch"] == 0


def test_epoch_counts_and_reshuffle(shards):
    pipe = build_pipeline(cfg(shards, crop="center"), batch_size=10)
    (e0, e1), batches = take_samples(pipe, 2)   # every batch has 10 samples (checked there)
    keys, keys1 = [s["key"] for s in e0], [s["key"] for s in e1]
    assert sorted(keys) == [f"{i:06d}" for i in range(N)]
    assert sorted(keys1) == sorted(keys) and keys1 != keys
    # 96 = 9 * 10 + 6: the 6 left over wait and open epoch 1's first batch
    assert [b["epoch"] for b in batches[:10]] == [0] * 9 + [1]
    assert batches[9]["sample_epochs"] == [0] * 6 + [1] * 4
    assert pipe.stats()["samples"] >= 2 * N
    pipe.close()


def test_captions_from_json(shards):
    with build_pipeline(cfg(shards, caption_key="json:caption"), batch_size=4) as pipe:
        b = next(pipe)
        assert b["captions"] == [f"json caption {int(k)}" for k in b["keys"]]
    with build_pipeline(cfg(shards, captions_getter=["json", "captions_getter"]), batch_size=4) as pipe:
        b = next(pipe)
        for c, k in zip(b["captions"], b["keys"]):
            assert c in (f"json caption {int(k)}", f"original caption {int(k)}")
    with build_pipeline(cfg(shards, captions_getter=["txt", "identity"]), batch_size=4) as pipe:
        assert next(pipe)["captions"][0].startswith("a photo of")


def test_exactly_once_2_ranks_2_workers(shards):
    """Over one epoch every sample is seen exactly once across 2 ranks x 2 worker processes."""
    per_rank = []
    for rank in range(2):
        pipe = build_pipeline(cfg(shards, num_workers=2), batch_size=5, rank=rank, world_size=2, seed=3)
        per_rank.append(epoch_keys(pipe, 1)[0])
        pipe.close()
    all_keys = per_rank[0] + per_rank[1]
    assert len(all_keys) == N and sorted(all_keys) == [f"{i:06d}" for i in range(N)]
    assert per_rank[0] and per_rank[1]


def test_exactly_once_with_fewer_shards_than_workers(tmp_path):
    paths = write_photo_shards(str(tmp_path), 20, 10)  # 2 shards for 4 global workers
    keys = []
    for rank in range(2):
        pipe = build_pipeline(cfg(paths, num_workers=2), batch_size=3, rank=rank, world_size=2)
        keys += epoch_keys(pipe, 1)[0]
        pipe.close()
    assert sorted(keys) == [f"{i:06d}" for i in range(20)]


def test_multi_aspect_one_bucket_per_batch(shards):
    ratios = ["1/1", "1/2", "2/3", "3/4", "9/16"]
    pipe = build_pipeline(cfg(shards, multi_aspect_ratio=ratios, num_workers=2), batch_size=4)
    table = pipe.spec.table
    seen = collections.Counter()
    for b in take_samples(pipe, 1)[1]:
        h, w = b["images"].shape[-2:]
        assert (h, w) in table.buckets
        for j in b["json"]:
            # each image's bucket is the closest ratio unless the 5 % random pick happened
            seen[(h, w) == table.closest(j["height"], j["width"])] += 1
    assert seen[True] > 0.8 * sum(seen.values())
    st = pipe.stats()
    assert sum(st["buckets"].values()) == st["samples"] and len(st["buckets"]) >= 3
    pipe.close()


def test_filters_end_to_end(shards):
    c = cfg(shards, dataset_filters=[["aesthetic_score", "lambda s: s > 4.5"], ["width", ">=", 96]])
    with build_pipeline(c, batch_size=4) as pipe:
        keys = epoch_keys(pipe, 1)[0]
        st = pipe.stats()
    from tools.photo_shards import DEFAULT_SIZES
    expect = [i for i in range(N) if round(3.0 + (i * 0.37) % 4.0, 3) > 4.5
              and DEFAULT_SIZES[i % len(DEFAULT_SIZES)][1] >= 96]
    assert sorted(int(k) for k in keys) == expect
    assert sum(st["filtered"].values()) >= N - len(expect)


def test_missing_filter_key_counted(tmp_path):
    a = write_photo_shards(str(tmp_path / "a"), 10, 5, with_json=False, prefix="nojson")
    b = write_photo_shards(str(tmp_path / "b"), 10, 5)
    with build_pipeline(cfg(a + b, dataset_filters=[["index", ">=", 0]]), batch_size=2) as pipe:
        keys = epoch_keys(pipe, 1)[0]
        assert len(keys) == 10
        assert set(pipe.stats()["missing_key"]) == {"index"}
        assert pipe.stats()["missing_key"]["index"] >= 10  # 10 in epoch 0 (+ read-ahead)


def test_empty_after_filter_raises(shards):
    c = cfg(shards[:4], dataset_filters=[["aesthetic_score", "lambda s: s > 100"]], num_workers=2)
    pipe = build_pipeline(c, batch_size=4)
    with pytest.raises(DataError, match="no sample survived") as e:
        next(pipe)
    assert "aesthetic_score" in str(e.value)
    pipe.close()


@pytest.mark.parametrize("workers,ratios", [(2, None), (2, ["1/1", "1/2", "3/4"]), (0, ["1/1", "2/3"])])
def test_resume_exact(shards, workers, ratios):
    """The next 20 samples after restoring the state equal those of an uninterrupted stream."""
    c = cfg(shards, num_workers=workers, multi_aspect_ratio=ratios, shuffle_buffer=12)
    ref = build_pipeline(c, batch_size=3, seed=5)
    for _ in range(13):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))
    # the position is inside a shuffle block and/or has samples waiting in buckets
    assert any(w["taken"] or w["left"] for w in state["workers"].values())
    expected, images = [], []
    while len(expected) < 20:
        b = next(ref)
        expected += b["keys"]
        images.append(b["images"])
    ref.close()
    again = build_pipeline(c, batch_size=3, seed=5, state=state)
    got, images2 = [], []
    while len(got) < 20:
        b = next(again)
        got += b["keys"]
        images2.append(b["images"])
    again.close()
    assert got == expected
    assert all(torch.equal(x, y) for x, y in zip(images, images2))


def test_resume_across_epoch_boundary(shards):
    c = cfg(shards, num_workers=2, multi_aspect_ratio=["1/1", "1/2"])
    ref = build_pipeline(c, batch_size=4, seed=1)
    states, keys = [], []
    for _ in range(40):
        states.append(ref.state_dict())
        keys.append(next(ref)["keys"])
    ref.close()
    for i in (12, 25, 33):
        p = build_pipeline(c, batch_size=4, seed=1, state=states[i])
        assert [next(p)["keys"] for _ in range(5)] == keys[i:i + 5]
        p.close()


def test_sources_forms(shards, tmp_path):
    d = os.path.dirname(shards[0])
    assert expand_sources(d) == shards
    assert expand_sources(f"file:{d}/shard-{{0000..0002}}.tar") == shards[:3]
    assert expand_sources([shards[0], "file:" + shards[1]]) == shards[:2]
    y = tmp_path / "list.yml"
    y.write_text(f"- {shards[0]}\n- file:{d}/shard-{{0003..0004}}.tar\n")
    assert expand_sources(str(y)) == [shards[0], shards[3], shards[4]]
    with pytest.raises(DataError, match="pipe"):
        expand_sources("pipe:cat x.tar")
    with pytest.raises(DataError, match="none of"):
        expand_sources(str(tmp_path / "missing.tar"))
    with pytest.raises(DataError, match="no .tar"):
        expand_sources(str(tmp_path))


def test_resampled_stream_and_resume(shards):
    c = cfg(shards, resampled=True, num_workers=2, multi_aspect_ratio=["1/1", "1/2"])
    ref = build_pipeline(c, batch_size=4, seed=2)
    batches = [next(ref) for _ in range(30)]
    assert all(len(b["keys"]) == 4 for b in batches)  # no flushing: always full batches
    assert max(b["epoch"] for b in batches) >= 1       # pseudo-epochs advance
    state = ref.state_dict()
    nxt = [next(ref)["keys"] for _ in range(5)]
    ref.close()
    again = build_pipeline(c, batch_size=4, seed=2, state=state)
    assert [next(again)["keys"] for _ in range(5)] == nxt
    again.close()


def test_draft_decode_matches_full_decode():
    """JPEG draft mode (decode at a reduced DCT scale) gives the same size and nearly the same
    pixels as decoding full size and resizing."""
    import io

    import numpy as np
    from PIL import Image

    from core.data.images import load_to_bucket
    from tools.photo_shards import jpeg_bytes, photo_variant
    data = jpeg_bytes(photo_variant(1, 600, 800), quality=95)
    fast = load_to_bucket(data, (128, 128), "center", np.random.default_rng(0))
    with Image.open(io.BytesIO(data)) as im:
        full = np.asarray(im.convert("RGB").resize((170, 128), Image.BILINEAR))[:, 21:149].transpose(2, 0, 1)
        im2 = Image.open(io.BytesIO(data))
        im2.draft("RGB", (170, 128))
        assert im2.size[0] < 800  # draft really reduced the decode size
    assert fast.shape == (3, 128, 128)
    assert np.abs(fast.astype(float) - full.astype(float)).mean() < 4.0


def test_state_is_small_and_json(shards):
    c = cfg(shards, num_workers=2, multi_aspect_ratio=["1/1", "1/2", "1/3"], shuffle_buffer=32)
    with build_pipeline(c, batch_size=8) as pipe:
        for _ in range(3):
            next(pipe)
        state = pipe.state_dict()
    text = json.dumps(state)
    assert len(text) < 4000 and set(state["workers"]) == {"0", "1"}
    w = state["workers"]["0"]
    assert {"epoch", "pos", "taken", "left", "counts"} <= set(w)


def test_changed_layout_restarts_next_epoch(shards, caplog):
    c = cfg(shards, num_workers=2)
    with build_pipeline(c, batch_size=4) as pipe:
        next(pipe)
        state = pipe.state_dict()
    with build_pipeline(cfg(shards, num_workers=0), batch_size=4, state=state) as pipe:
        assert next(pipe)["epoch"] == 1
    assert "other shards or another rank/worker layout" in caplog.text


def test_empty_resampled_stream_raises(shards):
    c = cfg(shards[:2], resampled=True, dataset_filters=[["aesthetic_score", "<", 0]])
    with build_pipeline(c, batch_size=2) as pipe:
        with pytest.raises(DataError, match="no sample survived"):
            next(pipe)
