"""Official state-dict layouts (tests/data/reference manifests) vs our modules built on meta."""
import json
from pathlib import Path

import pytest
import torch

from modules.lora import ReToken, apply_lora, lora_state_dict_official
from modules.registry import build_model


# tiny tensors: one intra-op thread is faster and avoids OpenMP oversubscription on shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


REF = Path(__file__).parent / "data" / "reference"


def _manifest(name):
    return json.loads((REF / f"{name}.json").read_text())


def _assert_layout(state_dict, manifest, model=None):
    keys = list(state_dict)
    assert keys == manifest["state_dict_keys_in_order"]
    for k, v in state_dict.items():
        want = manifest["parameters"].get(k, manifest["buffers"].get(k))
        assert list(v.shape) == want, k
    for k, dt in manifest["dtypes"].items():
        assert str(state_dict[k].dtype) == f"torch.{dt}", k
    if model is not None:
        params = dict(model.named_parameters())
        bufs = dict(model.named_buffers())
        assert sum(p.numel() for p in params.values()) == manifest["total_parameters"]
        assert len(params) == manifest["num_parameter_tensors"]
        persistent = [k for k in bufs if k in state_dict]
        assert len(persistent) == manifest["num_buffer_tensors"]
        assert sum(bufs[k].numel() for k in persistent) == manifest["total_buffer_elements"]


@pytest.mark.parametrize("manifest,kind,version", [
    ("stage_c_3b", "stage_c", "3.6B"),
    ("stage_c_1b", "stage_c", "1B"),
    ("stage_b_3b", "stage_b", "3B"),
    ("stage_b_700m", "stage_b", "700M"),
])
def test_official_layout(manifest, kind, version):
    model = build_model(kind, version, device="meta")
    _assert_layout(model.state_dict(), _manifest(manifest), model)


def test_stage_c_defaults_are_3b():
    from modules.stage_c import StageC

    with torch.device("meta"):
        model = StageC()
    assert list(model.state_dict()) == _manifest("stage_c_3b")["state_dict_keys_in_order"]


@pytest.fixture(scope="module")
def stage_c_3b_lora():
    model = build_model("stage_c", "3.6B", device="meta")
    loras = apply_lora(model, filters=[".attn"], rank=4)
    return model, loras


def test_stage_c_with_lora_layout(stage_c_3b_lora):
    model, loras = stage_c_3b_lora
    manifest = _manifest("stage_c_3b_with_lora_rank4")
    _assert_layout(model.state_dict(), manifest, model)
    assert len(loras) == 128


def test_lora_checkpoint_layout(stage_c_3b_lora):
    _, loras = stage_c_3b_lora
    manifest = _manifest("lora_c_3b_rank4")
    assert [name for name, _ in loras] == manifest["lora_targets_in_order"]
    with torch.device("meta"):
        retoken = ReToken([0] * manifest["buffers"]["embeddings.indices"][0])
    sd = lora_state_dict_official(loras, retoken)
    _assert_layout(sd, manifest)
    assert sum(v.numel() for k, v in sd.items() if k != "embeddings.indices") == manifest["total_parameters"]
