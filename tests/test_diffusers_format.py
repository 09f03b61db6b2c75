"""diffusers' StableCascadeUNet layout against the REAL diffusers package (requirements-dev), on the
tiny Stage C and Stage B: our export loads in diffusers with equal outputs, a folder written by
diffusers loads as our checkpoint with equal outputs, ours -> diffusers -> ours is exact, keys are
checked strictly, and the official sizes map key for key (on the meta device)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.diffusers_format import (
    DiffusersFormatError, check_config, diffusers_config, read_diffusers, save_diffusers, to_diffusers,
)
from fileio.errors import CheckpointError
from modules.loading import load_model
from modules.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet_cls():
    from diffusers import StableCascadeUNet as cls  # the real package: a missing one is an error, not a skip

    return cls


def _random(kind, seed=0):
    torch.manual_seed(seed)
    model = build_model(kind, "tiny").eval()
    with torch.no_grad():
        for p in model.parameters():  # non-zero everywhere (the init zeroes clf and the mappers)
            p.normal_(0, 0.2)
    return model


def _inputs(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "stage_c":
        return {"x": torch.randn(2, 16, 4, 4, generator=g), "r": torch.rand(2, generator=g),
                "clip_text": torch.randn(2, 77, 32, generator=g), "clip_text_pooled": torch.randn(2, 1, 32, generator=g),
                "clip_img": torch.randn(2, 1, 24, generator=g)}
    return {"x": torch.randn(2, 4, 16, 16, generator=g), "r": torch.rand(2, generator=g),
            "effnet": torch.randn(2, 16, 6, 6, generator=g), "clip": torch.randn(2, 1, 32, generator=g)}


def _ours(model, kind, a):
    with torch.no_grad():
        if kind == "stage_c":
            return model(a["x"], a["r"], a["clip_text"], a["clip_text_pooled"], a["clip_img"])
        return model(a["x"], a["r"], a["effnet"], a["clip"])


def _theirs(unet, kind, a):
    with torch.no_grad():
        if kind == "stage_c":
            return unet(a["x"], a["r"], clip_text_pooled=a["clip_text_pooled"], clip_text=a["clip_text"],
                        clip_img=a["clip_img"]).sample
        return unet(a["x"], a["r"], clip_text_pooled=a["clip"], effnet=a["effnet"]).sample


@pytest.mark.parametrize("kind", ["stage_c", "stage_b"])
def test_both_ways_equal_outputs_and_exact_round_trip(kind, unet_cls, tmp_path):
    ours, a = _random(kind), _inputs(kind)
    expected = _ours(ours, kind, a)
    sd = ours.state_dict()
    # ours -> diffusers: StableCascadeUNet.from_pretrained(folder) gives our outputs, with exactly our keys
    folder = save_diffusers(sd, kind, "tiny", tmp_path / "export")
    unet = unet_cls.from_pretrained(str(folder)).eval()
    assert set(unet.state_dict()) == set(to_diffusers(sd, kind))
    torch.testing.assert_close(_theirs(unet, kind, a), expected, rtol=0, atol=1e-5)
    # -> ours: exact
    back = load_model(kind, "tiny", folder).state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # a diffusers "finetune", written by diffusers itself: folder and single file load as our checkpoint
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    theirs = tmp_path / "finetune"
    unet.save_pretrained(str(theirs))
    want = _theirs(unet, kind, a)
    for path in (theirs, theirs / "diffusion_pytorch_model.safetensors"):
        torch.testing.assert_close(_ours(load_model(kind, "tiny", path).eval(), kind, a), want, rtol=0, atol=1e-5)


def test_official_sizes_map_key_for_key(unet_cls):
    for kind, version in (("stage_c", "3.6B"), ("stage_b", "3B")):
        cfg = {k: v for k, v in diffusers_config(kind, version).items() if not k.startswith("_")}
        with torch.device("meta"):
            unet = unet_cls(**cfg)
        want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
        ours = to_diffusers(build_model(kind, version, device="meta").state_dict(), kind)
        assert {k: tuple(v.shape) for k, v in ours.items()} == want, (kind, version)


def test_strict_keys_and_config_checks(tmp_path):
    sd = build_model("stage_c", "tiny").state_dict()
    folder = save_diffusers(sd, "stage_c", "tiny", tmp_path / "c")
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    # a missing tensor: the usual mismatch report, in our names
    single = tmp_path / "single.safetensors"
    save_file({k: v for k, v in weights.items() if not k.startswith("clf.1.")}, str(single))
    with pytest.raises(CheckpointError, match=r"missing keys: \['clf.1.weight'"):
        load_model("stage_c", "tiny", single)
    # a lone q/k/v third
    key = next(k for k in weights if k.endswith(".attention.to_k.weight"))
    save_file({k: v for k, v in weights.items() if k != key}, str(single))
    with pytest.raises(DiffusersFormatError, match="has no to_k.weight"):
        read_diffusers(single, "stage_c", "tiny")
    # the folder's config.json must describe the run's model_version
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(DiffusersFormatError, match="it is stage_c model_version 'tiny'"):
        check_config(config, "stage_c", "1B", "config.json")
    with pytest.raises(DiffusersFormatError, match="not a StableCascadeUNet"):
        check_config({**config, "_class_name": "UNet2DConditionModel"}, "stage_c", "tiny", "config.json")
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_model("stage_c", "tiny", tmp_path)
    # a Stage B folder is not a Stage C checkpoint
    b = save_diffusers(build_model("stage_b", "tiny").state_dict(), "stage_b", "tiny", tmp_path / "b")
    with pytest.raises(DiffusersFormatError, match="does not describe stage_c"):
        load_model("stage_c", "tiny", b)


def test_export_tool_both_directions_exact(tmp_path):
    from fileio.state_dicts import save_safetensors
    from tools.export_diffusers import main

    ours = _random("stage_b", seed=3).state_dict()
    src = tmp_path / "stage_b_tiny.safetensors"
    save_safetensors(ours, src)
    assert main([str(src), "--out", str(tmp_path / "decoder")]) == 0
    assert json.loads((tmp_path / "decoder" / "config.json").read_text())["effnet_in_channels"] == 16
    assert main([str(tmp_path / "decoder"), "--to-official", "--out", str(tmp_path / "back.safetensors")]) == 0
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)

