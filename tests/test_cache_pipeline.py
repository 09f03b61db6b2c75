"""The encoder cache read through core.data's tensor pipeline: shuffled epochs, rank/worker split,
exact resume, shape-pure batches of a bucketed cache, and one-line errors for bad cache folders.

Caches are written by the real tools/cache_dataset.py over the tiny demo models and photo shards;
the data-layer tests at the end use synthetic tensor shards (the data layer knows no encoders)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.cache_assets import tool_cache
from tests.helpers.epochs import epoch_keys, take_samples

N = 16   # cached samples: 8 photos x 2 variants, in 4 shards


@pytest.fixture(scope="module")
def cache_dir(train_assets, tmp_path_factory, one_thread):
    return tool_cache(train_assets, tmp_path_factory.getbasetemp())[0]


@pytest.fixture(scope="module")
def bucketed_cache(train_assets, tmp_path_factory, one_thread):
    """Square, 1:2 and 2:1 buckets; half the samples go to a random bucket, so both latent shapes occur."""
    cache, info = tool_cache(train_assets, tmp_path_factory.getbasetemp(), "cache_bucketed",
                             multi_aspect_ratio=["1/1", "1/2"], bucket_random_ratio=0.5)
    assert info["samples"] == N
    return cache


def pipeline(cache, batch_size=3, **kw):
    from train.stage_c_cache import build_cache_pipeline

    kw.setdefault("num_workers", 0)
    return build_cache_pipeline(cache, batch_size, seed=kw.pop("seed", 5), **kw)


def test_epochs_are_reshuffled_and_complete(cache_dir):
    with pipeline(cache_dir) as pipe:
        e0, e1 = epoch_keys(pipe, 2)
    assert len(e0) == len(set(e0)) == N and sorted(e0) == sorted(e1)   # every sample once per epoch
    assert e0 != e1


def test_ranks_and_workers_split_the_epoch(cache_dir):
    got = {}
    for rank in (0, 1):
        with pipeline(cache_dir, rank=rank, world_size=2) as pipe:
            got[rank] = epoch_keys(pipe, 1)[0]
    assert got[0] and got[1] and not set(got[0]) & set(got[1])
    with pipeline(cache_dir) as pipe:
        assert sorted(got[0] + got[1]) == sorted(epoch_keys(pipe, 1)[0])
    # two worker processes per rank: 4 readers over the 4 shards, still a partition of the epoch
    procs = []
    for rank in (0, 1):
        with pipeline(cache_dir, rank=rank, world_size=2, num_workers=2) as pipe:
            procs.extend(epoch_keys(pipe, 1)[0])
    assert sorted(procs) == sorted(got[0] + got[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(bucketed_cache, workers):
    """A state saved after some batches, restored into a new pipeline, continues with the very same
    batches (also across the epoch boundary, with samples waiting in buckets)."""
    with pipeline(bucketed_cache, num_workers=workers) as pipe:
        for _ in range(3):
            next(pipe)
        state = json.loads(json.dumps(pipe.state_dict()))    # survives a checkpoint (JSON)
        assert any(c.get("left") for c in state["workers"].values())   # samples waiting in buckets
        expected = [next(pipe) for _ in range(6)]
    with pipeline(bucketed_cache, num_workers=workers, state=state) as resumed:
        again = [next(resumed) for _ in range(6)]
    assert {0, 1} <= {b["epoch"] for b in expected}
    for a, b in zip(expected, again):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"] and a["epoch"] == b["epoch"]
        for k in ("latents", "clip_text", "clip_text_pooled", "clip_img"):
            assert torch.equal(a[k], b[k])


def test_bucketed_cache_batches_one_shape(bucketed_cache):
    shapes = set()
    with pipeline(bucketed_cache, batch_size=4) as pipe:
        (epoch0,), batches = take_samples(pipe, 1)   # every batch full (checked there)
    for b in batches:
        h, w = b["latents"].shape[-2:]
        # the batch is one bucket: every sample's recorded bucket gives the batch's latent size
        assert {tuple(j["bucket"]) for j in b["json"]} == {(h * 32, w * 32)}
        shapes.add((h, w))
    keys = [x["key"] for x in epoch0]
    assert len(shapes) >= 2 and sorted(keys) == sorted(set(keys)) and len(keys) == N


def test_former_reader_state_starts_fresh(cache_dir, caplog):
    with pipeline(cache_dir, state={"position": 21}) as pipe:
        assert next(pipe)["epoch"] == 0
    assert "former cache reader" in caplog.text


@pytest.mark.parametrize("case", ["missing", "empty", "image_shards", "lost_shard"])
def test_bad_cache_folder_is_one_line_naming_it(case, tmp_path, cache_dir, train_assets):
    import shutil

    from core.errors import UserError
    from train.stage_c_cache import load_unconditional

    folder = tmp_path / "c"
    if case == "empty":
        folder.mkdir()
    elif case == "image_shards":    # a dataset folder given as the cache
        shutil.copytree(train_assets / "shards", folder)
    elif case == "lost_shard":
        shutil.copytree(cache_dir, folder)
        (folder / "cache-000002.tar").unlink()
    with pytest.raises(UserError) as err:
        pipeline(folder)
    msg = str(err.value)
    assert str(folder) in msg and "\n" not in msg, msg
    if case != "lost_shard":
        with pytest.raises(UserError, match="cache_path"):
            load_unconditional(folder)


# ------------------------------------------------------------------ the generic data layer
def _tensor_shards(folder: Path, n: int = 12, shard_size: int = 4) -> Path:
    from core.data import TENSORS_EXT, ShardWriter, encode_tensors

    with ShardWriter(folder, prefix="t", shard_size=shard_size) as w:
        for i in range(n):
            side = 2 if i % 3 else 3
            w.add(f"s{i:03d}", {TENSORS_EXT: encode_tensors({"a": torch.full((side, side), float(i)),
                                                             "b": torch.tensor([i], dtype=torch.int64)}),
                                "txt": f"caption {i}".encode()})
    return folder


def test_tensor_source_from_a_path(tmp_path):
    from core.data import build_pipeline

    folder = _tensor_shards(tmp_path / "t")
    seen = {}
    with build_pipeline(str(folder), batch_size=4, seed=1, num_workers=0, sample_format="tensors") as pipe:
        while pipe.epoch < 1:
            b = next(pipe)
            assert set(b) == {"a", "b", "captions", "keys", "urls", "json", "sample_epochs", "epoch"}
            assert b["a"].dtype == torch.float32 and b["b"].dtype == torch.int64
            assert len({tuple(x.shape) for x in b["a"]}) == 1              # one shape per batch
            for k, a, i, c, e in zip(b["keys"], b["a"], b["b"], b["captions"], b["sample_epochs"]):
                if e == 0:
                    seen[k] = (float(a[0, 0]), int(i), c)
    assert seen == {f"s{i:03d}": (float(i), i, f"caption {i}") for i in range(12)}


def test_tensor_source_skips_damaged_members(tmp_path):
    from core.data import TENSORS_EXT, build_pipeline, write_tar

    folder = _tensor_shards(tmp_path / "t", n=8)
    write_tar(str(folder / "z-bad.tar"), [("bad1", {TENSORS_EXT: b"\x10\0\0\0\0\0\0\0{not json}......",
                                                    "txt": b"x"}),
                                          ("bad2", {"txt": b"no tensors"})])
    with build_pipeline(str(folder), batch_size=4, num_workers=0, sample_format="tensors") as pipe:
        keys = epoch_keys(pipe, 1)[0]
        bad = pipe.stats()["bad"]
    assert sorted(keys) == [f"s{i:03d}" for i in range(8)]
    assert set(bad) == {"undecodable_tensors", "missing_tensors"}   # counted per read (epoch 1 began too)
