"""Checkpoint reading, strict loading with helpful errors, and atomic safetensors writing."""
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn

from modules import registry
from fileio.errors import CheckpointError
from fileio.state_dicts import read_state_dict, save_safetensors
from modules.loading import load_model, mismatch_report
from modules.registry import build_model, describe_model_version, registered_shapes


# tiny tensors: one intra-op thread is faster and avoids OpenMP oversubscription on shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    return dict(x=torch.randn(2, 16, 8, 8, generator=g).to(dtype), r=torch.rand(2, generator=g),
                clip_text=torch.randn(2, 77, 32, generator=g).to(dtype),
                clip_text_pooled=torch.randn(2, 1, 32, generator=g).to(dtype),
                clip_img=torch.randn(2, 1, 24, generator=g).to(dtype))


@pytest.fixture(scope="module")
def tiny_c():
    return _randomise(build_model("stage_c", "tiny"))


def test_bf16_round_trip(tiny_c, tmp_path):
    path = tmp_path / "stage_c_tiny_bf16.safetensors"
    save_safetensors(tiny_c, path, dtype=torch.bfloat16, metadata={"model_version": "tiny"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"model_version": "tiny"}
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind

    ref_bf16 = build_model("stage_c", "tiny")
    ref_bf16.load_state_dict(tiny_c.state_dict())
    ref_bf16 = ref_bf16.to(torch.bfloat16).eval()
    loaded = load_model("stage_c", "tiny", path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(torch.bfloat16)), ref_bf16(**_inputs(torch.bfloat16)))
        up = load_model("stage_c", "tiny", path, dtype=torch.float32).eval()
        ref_up = ref_bf16.float()
        assert torch.equal(up(**_inputs(torch.float32)), ref_up(**_inputs(torch.float32)))
    assert all(p.requires_grad for p in up.parameters())


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("ext", [".pt", ".ckpt"])
def test_torch_files(tiny_c, tmp_path, wrapped, ext):
    sd = tiny_c.state_dict()
    path = tmp_path / f"model{ext}"
    torch.save({"state_dict": sd, "step": torch.tensor(3)} if wrapped else sd, path)
    assert list(read_state_dict(path)) == list(sd)
    loaded = load_model("stage_c", "tiny", path)
    for (k, a), b in zip(sd.items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_model("stage_c", "tiny", tmp_path / "nope.safetensors")
    bad = tmp_path / "model.h5"
    bad.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="model.h5"):
        read_state_dict(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        read_state_dict(junk)
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, nested)
    with pytest.raises(CheckpointError, match="nested.pt"):
        read_state_dict(nested)


def test_describe_model_version_official_shapes():
    for version in ("3.6B", "1B", "tiny"):
        assert describe_model_version("stage_c", registered_shapes("stage_c", version)) == version
    shapes_1b = registered_shapes("stage_c", "1B")
    partial = dict(list(shapes_1b.items())[:-10])
    assert describe_model_version("stage_c", partial) == "1B"
    assert describe_model_version("stage_c", {"foo": (1,)}) is None
    msg = mismatch_report("stage_c", "3.6B", shapes_1b, registered_shapes("stage_c", "3.6B"), "stage_c_lite_bf16.safetensors")
    assert "stage_c_lite_bf16.safetensors" in msg and "'1B'" in msg and "missing keys" in msg
    assert "clip_txt_mapper.weight: file (1536, 1280) vs model (2048, 1280)" in msg
    assert mismatch_report("stage_c", "1B", shapes_1b, shapes_1b, "x") is None


def test_wrong_version_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.MODEL_CONFIGS["stage_c"], "tiny-wide",
                        dict(registry.MODEL_CONFIGS["stage_c"]["tiny"], c_hidden=[48, 48], c_cond=48))
    path = tmp_path / "wide.safetensors"
    save_safetensors(build_model("stage_c", "tiny-wide"), path)
    with pytest.raises(CheckpointError) as info:
        load_model("stage_c", "tiny", path)
    assert "wide.safetensors" in str(info.value) and "'tiny-wide'" in str(info.value)
    # an extra key is reported as unexpected
    sd = build_model("stage_c", "tiny").state_dict()
    sd["extra.weight"] = torch.zeros(2)
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match="unexpected keys.*extra.weight"):
        load_model("stage_c", "tiny", path)
    registry._version_shapes.cache_clear()


class _BufferNet(nn.Module):
    """A conv + BatchNorm (persistent int64/float buffers) and a non-persistent buffer."""

    def __init__(self, c: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)
        self.register_buffer("scale", torch.arange(c, dtype=torch.float32), persistent=False)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale[None, :, None, None]


def test_buffers_int64_and_non_persistent(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.MODEL_CONFIGS, "buffer_net", {"default": {}})
    monkeypatch.setitem(registry.MODEL_CLASSES, "buffer_net", (__name__, "_BufferNet"))
    assert sys.modules[__name__]._BufferNet is _BufferNet
    src = _BufferNet()
    src.train()(torch.randn(4, 3, 2, 2))  # non-trivial running stats
    path = tmp_path / "bn.safetensors"
    save_safetensors(src, path, dtype=torch.bfloat16)
    model = load_model("buffer_net", "default", path, dtype=torch.bfloat16)
    assert model.bn.num_batches_tracked.dtype == torch.int64 and model.bn.num_batches_tracked.item() == 1
    assert torch.equal(model.bn.running_mean, src.bn.running_mean.bfloat16())
    assert torch.equal(model.scale, torch.arange(3, dtype=torch.bfloat16))
    registry._version_shapes.cache_clear()


def test_non_strict_warns(tiny_c, tmp_path):
    sd = dict(tiny_c.state_dict())
    dropped = sd.pop("clf.1.weight")
    path = tmp_path / "partial.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match="missing keys.*clf.1.weight"):
        load_model("stage_c", "tiny", path)
    with pytest.warns(UserWarning, match="clf.1.weight"):
        model = load_model("stage_c", "tiny", path, strict=False)
    assert model.clf[1].weight.shape == dropped.shape
    assert torch.equal(model.embedding[1].weight, tiny_c.embedding[1].weight)


def test_save_shared_and_view_tensors(tmp_path):
    w = torch.randn(6, 4)
    sd = {"a": w, "b": w, "c": w[:3], "i": torch.arange(3)}
    path = tmp_path / "shared.safetensors"
    save_safetensors(sd, path, dtype=torch.bfloat16)
    back = read_state_dict(path)
    assert torch.equal(back["a"], w.bfloat16()) and torch.equal(back["c"], w[:3].bfloat16())
    assert back["i"].dtype == torch.int64
    with pytest.raises(TypeError):
        save_safetensors({"a": {"nested": w}}, path)


def test_load_state_dict_strict_names_the_source_and_first_keys():
    from modules.loading import load_state_dict_strict, state_dict_mismatch, StateDictMismatchError

    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = {k: torch.ones_like(v) for k, v in net.state_dict().items()}
    assert state_dict_mismatch(net.state_dict(), sd) is None
    load_state_dict_strict(net, sd, "ok.safetensors", dtype=torch.float64)
    assert torch.equal(net[0].weight, torch.ones(3, 4).T)
    bad = dict(sd, extra=torch.zeros(1))
    bad.pop("0.bias")
    bad["1.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(net, bad, "bad.safetensors", hint="(check the version)")
    msg = str(info.value)
    assert isinstance(info.value, (StateDictMismatchError, ValueError)) and "\n" not in msg
    assert msg.startswith("bad.safetensors: ") and msg.endswith("(check the version)")
    assert "1 missing keys: ['0.bias']" in msg and "1 unexpected keys: ['extra']" in msg
    assert "1.weight: file (5, 5) vs model (2, 4)" in msg


def test_detect_model_version_reads_the_header(tmp_path):
    from modules.loading import detect_model_version

    path = tmp_path / "b.safetensors"
    save_safetensors(build_model("stage_b", "tiny"), path)
    assert detect_model_version("stage_b", path) == "tiny"
    assert detect_model_version("stage_c", path) is None
    pt = tmp_path / "b.pt"
    torch.save(build_model("stage_b", "tiny").state_dict(), pt)
    assert detect_model_version("stage_b", pt) is None        # only safetensors headers are read
    with pytest.raises(CheckpointError, match="not found"):
        detect_model_version("stage_b", tmp_path / "missing.safetensors")
