"""Every batch is full: partial buckets carry over into the next epoch (images and tensor samples,
2 ranks x 2 worker processes), every sample is used once per epoch, resume is exact with samples
carried over, and the per-sample draws do not depend on where the dataset is mounted."""
from __future__ import annotations

import collections
import json
import shutil

import pytest
import torch

from core.data import DataConfig, build_pipeline, expand_named_sources
from tests.helpers.epochs import take_samples
from tools.photo_shards import write_photo_shards

N = 60            # samples: 6 shards of 10 for 4 readers (2 ranks x 2 workers): unequal shares
RATIOS = ["1/1", "1/2", "2/3", "3/4", "9/16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_photo_shards(str(tmp_path_factory.mktemp("full") / "set"), N, 10)


def cfg(path, **kw):
    base = dict(webdataset_path=path, image_size=64, num_workers=2, shuffle_buffer=8,
                multi_aspect_ratio=RATIOS, caption_key="json:caption")
    base.update(kw)
    return DataConfig(**base)


def folder(shards):
    return shards[0].rsplit("/", 1)[0]


def test_bucketed_two_ranks_two_workers_three_epochs(shards):
    """Every batch holds 4 samples of one bucket, each sample is used once in each of 3 epochs,
    and the leftovers of an epoch really open batches of the next one."""
    per_epoch = [[] for _ in range(3)]
    carried = 0
    for rank in (0, 1):
        with build_pipeline(cfg(folder(shards)), batch_size=4, rank=rank, world_size=2, seed=7) as pipe:
            epochs, batches = take_samples(pipe, 3)   # asserts that every batch is full
        for e in range(3):
            per_epoch[e] += [s["key"] for s in epochs[e]]
        for b in batches:
            assert b["images"].shape[0] == 4 and b["epoch"] >= max(b["sample_epochs"])
            carried += len(set(b["sample_epochs"])) > 1   # a rare bucket may span several epochs
    for keys in per_epoch:
        assert sorted(keys) == [f"{i:06d}" for i in range(N)]
    assert carried >= 3   # buckets did carry over across epoch ends (no short batches instead)


def test_resume_with_carried_over_samples_is_exact(shards):
    """A state saved while samples of an earlier epoch wait in buckets, in the middle of a shuffle
    block, continues with the very same batches (keys and pixels)."""
    c = cfg(folder(shards))
    with build_pipeline(c, batch_size=4, rank=1, world_size=2, seed=3) as ref:
        state = None
        for _ in range(200):
            next(ref)
            st = ref.state_dict()
            workers = st["workers"].values()
            if any(ref_[0] < w["epoch"] for w in workers for ref_ in w["left"]) and \
                    any(w["taken"] for w in workers):
                state = json.loads(json.dumps(st))
                break
        assert state is not None, "no position with carried-over samples was reached"
        expected = [next(ref) for _ in range(8)]
    with build_pipeline(c, batch_size=4, rank=1, world_size=2, seed=3, state=state) as again:
        got = [next(again) for _ in range(8)]
    for a, b in zip(expected, got):
        assert a["keys"] == b["keys"] and a["sample_epochs"] == b["sample_epochs"]
        assert a["captions"] == b["captions"] and torch.equal(a["images"], b["images"])
    # the re-read waiting samples did come out after the restart
    assert any(min(b["sample_epochs"]) < b["epoch"] for b in got)


def test_moving_the_dataset_keeps_batches_and_draws(shards, tmp_path):
    """A copy of the folder elsewhere gives bitwise the same batches (random buckets, caption
    choices and crops are drawn from the shard's name within its folder), and a saved position
    resumes on the copy."""
    moved = shutil.copytree(folder(shards), tmp_path / "elsewhere" / "renamed")
    # a strong random-bucket share, random crops and a random caption choice: the draws matter
    kw = dict(bucket_random_ratio=0.5, crop="random", caption_key=None,
              captions_getter=["json", "captions_getter"], num_workers=0)
    with build_pipeline(cfg(folder(shards), **kw), batch_size=4, seed=11) as a, \
            build_pipeline(cfg(str(moved), **kw), batch_size=4, seed=11) as b:
        for _ in range(6):
            x, y = next(a), next(b)
            assert x["keys"] == y["keys"] and x["captions"] == y["captions"]
            assert torch.equal(x["images"], y["images"])
            assert all(u.startswith(str(moved)) for u in y["urls"])
        state = a.state_dict()
        nxt = [next(a) for _ in range(4)]
    with build_pipeline(cfg(str(moved), **kw), batch_size=4, seed=11, state=state) as c:
        again = [next(c) for _ in range(4)]
    assert [x["keys"] for x in again] == [x["keys"] for x in nxt]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(again, nxt))
    assert {x for b in nxt for x in b["captions"]} & {f"original caption {i}" for i in range(N)}


def test_shard_names_are_relative_to_their_source(shards, tmp_path):
    d = folder(shards)
    names = [n for _, n in expand_named_sources(d)]
    assert names == [f"0:shard-{i:04d}.tar" for i in range(6)]
    assert [n for _, n in expand_named_sources(f"file:{d}/shard-{{0001..0002}}.tar")] == \
        ["0:shard-0001.tar", "0:shard-0002.tar"]
    assert [n for _, n in expand_named_sources([shards[3], d + "/*-0005.tar"])] == \
        ["0:shard-0003.tar", "1:shard-0005.tar"]
    parent = d.rsplit("/", 1)[0]
    assert [n for _, n in expand_named_sources(f"{parent}/{{set,set}}/shard-0000.tar")] == \
        ["0:set/shard-0000.tar"] * 2
    listing = tmp_path / "list.yml"
    listing.write_text(f"- {d}\n- {shards[0]}\n")
    got = [n for _, n in expand_named_sources([str(listing), shards[1]])]
    assert got == names + ["1:shard-0000.tar", "2:shard-0001.tar"]


def test_partial_batches_flushes_for_one_pass_readers(shards):
    with build_pipeline(cfg(shards, multi_aspect_ratio=None, num_workers=0), batch_size=7,
                        partial_batches=True) as pipe:
        sizes = []
        while True:
            b = next(pipe)
            if b["epoch"] > 0:
                break
            sizes.append(len(b["keys"]))
            assert b["sample_epochs"] == [0] * len(b["keys"])
    assert sizes == [7] * 8 + [4]   # 60 = 8 * 7 + 4: the leftover is a short batch in its epoch


def test_tensor_samples_full_batches_two_ranks_two_workers(tmp_path):
    """The cache's sample format: 2 signatures, 13 samples in 4 shards, batches of 3."""
    from core.data import TENSORS_EXT, ShardWriter, encode_tensors

    with ShardWriter(tmp_path / "t", prefix="t", shard_size=4) as w:
        for i in range(13):
            side = 2 if i % 3 else 3
            w.add(f"s{i:03d}", {TENSORS_EXT: encode_tensors({"a": torch.full((side, side), float(i))}),
                                "txt": f"caption {i}".encode()})
    per_epoch: list[collections.Counter] = [collections.Counter() for _ in range(3)]
    for rank in (0, 1):
        with build_pipeline(str(tmp_path / "t"), batch_size=3, rank=rank, world_size=2, num_workers=2,
                            seed=2, sample_format="tensors") as pipe:
            epochs, batches = take_samples(pipe, 3)
        for e in range(3):
            per_epoch[e].update(s["key"] for s in epochs[e])
        for b in batches:
            assert b["a"].shape[0] == 3
            assert [float(x[0, 0]) for x in b["a"]] == [float(k[1:]) for k in b["keys"]]
    for counts in per_epoch:
        assert counts == collections.Counter(f"s{i:03d}" for i in range(13))
