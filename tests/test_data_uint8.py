"""uint8 image batches (``image_dtype='uint8'``) converted on the training device give bitwise the
float32 batches the workers used to make; the training core takes that path.

The tiny runs' losses and weights under the uint8 path are pinned by ``tests/test_golden_runs.py``
(``tests/data/golden_runs.json`` was recorded with the float32 worker path and is unchanged).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.batches import Batches
from core.data import DataConfig, DataError, build_pipeline
from core.data.device import images_to_float
from tools.photo_shards import write_photo_shards

pytestmark = pytest.mark.usefixtures("one_thread")

RATIOS = ["1/1", "2/3", "9/16"]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("u8shards")
    write_photo_shards(str(d), 24, 8)
    return str(d)


def _cfg(path: str, **kw) -> DataConfig:
    base = dict(webdataset_path=path, image_size=64, num_workers=0, shuffle_buffer=16,
                multi_aspect_ratio=RATIOS)
    base.update(kw)
    return DataConfig(**base)


def test_every_byte_value_converts_as_the_worker_did():
    values = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    want = np.empty(values.shape, np.float32)
    np.divide(values, np.float32(255.0), out=want, casting="unsafe")
    got = images_to_float(torch.from_numpy(values), "cpu")
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(want))
    f = torch.rand(2, 3)
    assert images_to_float(f) is f  # float batches pass through
    with pytest.raises(TypeError, match="uint8 or float"):
        images_to_float(torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("workers", [0, 1])
def test_uint8_batches_equal_float_batches(shard_dir, workers):
    cfg = _cfg(shard_dir, num_workers=workers)
    with build_pipeline(cfg, batch_size=4) as ref, build_pipeline(cfg, batch_size=4, image_dtype="uint8") as u8:
        for _ in range(5):
            a, b = next(ref), next(u8)
            assert b["images"].dtype == torch.uint8 and b["images"].shape == a["images"].shape
            assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
            b = u8.to_device(b, "cpu")
            assert b["images"].dtype == torch.float32 and torch.equal(a["images"], b["images"])
        assert ref.state_dict() == u8.state_dict()  # same positions: a run may switch paths on resume


def test_float_pipeline_to_device_is_a_no_op(shard_dir):
    with build_pipeline(_cfg(shard_dir), batch_size=4) as pipe:
        b = next(pipe)
        images = b["images"]
        assert pipe.to_device(b, "cpu")["images"] is images


def test_bad_image_dtype_is_one_line_error(shard_dir):
    with pytest.raises(DataError, match="image_dtype: expected one of"):
        build_pipeline(_cfg(shard_dir), batch_size=4, image_dtype="float16")


def test_batches_convert_on_the_device_and_keep_previews_on_cpu(shard_dir):
    cfg = _cfg(shard_dir)
    with build_pipeline(cfg, batch_size=4) as ref:
        want = [next(ref)["images"] for _ in range(2)]
    pipe = build_pipeline(cfg, batch_size=4, image_dtype="uint8")
    batches = Batches(pipe, num_preview=2, device=torch.device("cpu"))
    try:
        got = [batches.next() for _ in range(2)]
        assert list(got[0])[0] == "images"  # key order kept: the fault injection poisons the first float tensor
        assert all(torch.equal(w, g["images"]) for w, g in zip(want, got))
        prev = batches.preview_batch["images"]
        assert prev.device.type == "cpu" and torch.equal(prev, want[0][:2])
    finally:
        batches.close()


def test_training_core_asks_for_uint8(monkeypatch):
    import core.data

    from core.training import TrainingCore

    seen = {}

    def fake_build_pipeline(cfg, **kw):
        seen.update(kw)
        return "pipeline"

    monkeypatch.setattr(core.data, "build_pipeline", fake_build_pipeline)

    class Stub:
        cfg = type("C", (), {"seed": 0, "num_workers": 0})()
        dist = type("D", (), {"rank": 0, "world_size": 1})()

    assert TrainingCore.build_pipeline(Stub(), 4, None) == "pipeline"
    assert seen["image_dtype"] == "uint8"
