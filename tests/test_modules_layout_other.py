"""Stage A, EfficientNet encoder, Previewer and the four ControlNets vs the official manifests (meta)."""
import json
from pathlib import Path

import pytest
import torch

from modules.controlnet import ControlNet
from modules.effnet import EfficientNetEncoder
from modules.previewer import Previewer
from modules.stage_a import StageA

REF = Path(__file__).parent / "data" / "reference"
PROJ = [0, 4, 8, 12, 51, 55, 59, 63]

BUILDERS = {
    "stage_a": lambda: StageA(),
    "effnet_encoder": lambda: EfficientNetEncoder(),
    "previewer": lambda: Previewer(),
    "controlnet_c_3b_canny": lambda: ControlNet(c_in=1, proj_blocks=PROJ),
    "controlnet_c_3b_inpainting": lambda: ControlNet(c_in=4, proj_blocks=PROJ, bottleneck_mode=None),
    "controlnet_c_3b_sr": lambda: ControlNet(c_in=16, proj_blocks=PROJ, bottleneck_mode="large"),
    "controlnet_c_3b_identity": lambda: ControlNet(c_in=512, proj_blocks=list(range(64)), bottleneck_mode="simple"),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_official_layout(name):
    manifest = json.loads((REF / f"{name}.json").read_text())
    with torch.device("meta"):
        model = BUILDERS[name]()
    state = model.state_dict()
    assert list(state) == manifest["state_dict_keys_in_order"]
    params = dict(model.named_parameters())
    buffers = {k: v for k, v in model.named_buffers() if k in state}
    assert set(params) == set(manifest["parameters"])
    assert set(buffers) == set(manifest["buffers"])
    for key, tensor in state.items():
        expected = manifest["parameters"].get(key, manifest["buffers"].get(key))
        assert list(tensor.shape) == expected, key
    for key, dtype in manifest["dtypes"].items():
        assert str(state[key].dtype) == f"torch.{dtype}", key
    assert sum(p.numel() for p in params.values()) == manifest["total_parameters"]
    assert sum(b.numel() for b in buffers.values()) == manifest["total_buffer_elements"]
    assert len(params) == manifest["num_parameter_tensors"]
    assert len(buffers) == manifest["num_buffer_tensors"]


def test_registry_controlnet_versions_match_manifests():
    """The registry's ControlNet versions build the official layouts (meta device)."""
    import json
    from pathlib import Path

    from modules.registry import build_model

    ref_dir = Path(__file__).parent / "data" / "reference"
    for version in ("canny", "inpainting", "sr", "identity"):
        manifest = json.loads((ref_dir / f"controlnet_c_3b_{version}.json").read_text())
        model = build_model("controlnet", version, device="meta")
        assert list(model.state_dict()) == manifest["state_dict_keys_in_order"], version
