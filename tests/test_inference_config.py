"""Inference configs: the shipped official ones load, keys are checked, paths resolve."""
import glob
from pathlib import Path

import pytest
import torch

from inference.config import load_inference_config
from inference.errors import UserError
from inference.sampling import (STAGE_B_INFERENCE, STAGE_C_INFERENCE, SamplingSettings,
                                stage_b_shape, stage_c_shape)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "inference"


@pytest.mark.parametrize("path", sorted(glob.glob(str(CONFIGS / "*.yaml"))), ids=lambda p: Path(p).name)
def test_shipped_configs_load(path):
    cfg = load_inference_config(path)
    assert cfg.stage in ("c", "b")


def test_official_values():
    c = load_inference_config(CONFIGS / "stage_c_3b.yaml")
    b = load_inference_config(CONFIGS / "stage_b_3b.yaml")
    assert (c.stage, c.model_version, c.dtype) == ("c", "3.6B", "bfloat16")
    assert c.generator_checkpoint_path == "models/stage_c_bf16.safetensors"
    assert (b.stage, b.model_version) == ("b", "3B")
    assert b.stage_a_checkpoint_path == "models/stage_a.safetensors"
    lora = load_inference_config(CONFIGS / "lora_c_3b.yaml")
    assert lora.uses_lora and lora.rank == 4 and lora.train_tokens == [["[fernando]", "^dog</w>"]]
    sr = load_inference_config(CONFIGS / "controlnet_c_3b_sr.yaml")
    assert sr.controlnet_bottleneck_mode == "large" and sr.controlnet_filter == "SREffnetFilter"
    identity = load_inference_config(CONFIGS / "controlnet_c_3b_identity.yaml")
    assert identity.controlnet_blocks == list(range(64)) and identity.controlnet_checkpoint_path is None


def test_official_filters_resolve():
    from inference.control import build_filter

    channels = {"canny": 1, "inpainting": 4, "sr": 16, "identity": 512}
    for name, c_in in channels.items():
        cfg = load_inference_config(CONFIGS / f"controlnet_c_3b_{name}.yaml")
        filt = build_filter(cfg.controlnet_filter, cfg.controlnet_filter_params, torch.device("cpu"))
        assert filt.num_channels() == c_in


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match="did you mean 'generator_checkpoint_path'"):
        load_inference_config({"model_version": "3.6B", "generater_checkpoint_path": "x"})


def test_type_and_value_errors():
    with pytest.raises(UserError, match="'rank' must be"):
        load_inference_config({"model_version": "3.6B", "rank": "four"})
    with pytest.raises(UserError, match="not a Stage C version"):
        load_inference_config({"model_version": "3B", "stage": "c"})
    with pytest.raises(UserError, match="set 'stage: c'"):
        load_inference_config({"model_version": "tiny"})
    with pytest.raises(UserError, match="float16"):
        load_inference_config({"model_version": "3.6B", "dtype": "float16"})
    with pytest.raises(UserError, match="config file not found"):
        load_inference_config("/nonexistent/config.yaml")


def test_overrides_and_root(tmp_path):
    (tmp_path / "clip" / "text").mkdir(parents=True)
    cfg = load_inference_config(CONFIGS / "tiny_c.yaml", ["steps=3", "cfg=2.5"], root=tmp_path)
    assert cfg.steps == 3 and cfg.cfg == 2.5
    assert cfg.generator_checkpoint_path == str(tmp_path / "stage_c_tiny.safetensors")
    assert cfg.clip_text_model_name == str(tmp_path / "clip" / "text")
    # an HF name that is not a folder under root stays a hub name
    assert load_inference_config(CONFIGS / "stage_c_3b.yaml", root=tmp_path).clip_text_model_name \
        == "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


def test_official_sampling_settings_and_shapes():
    assert (STAGE_C_INFERENCE.timesteps, STAGE_C_INFERENCE.cfg, STAGE_C_INFERENCE.shift) == (20, 4, 2)
    assert (STAGE_B_INFERENCE.timesteps, STAGE_B_INFERENCE.cfg, STAGE_B_INFERENCE.shift) == (10, 1.1, 1)
    assert STAGE_C_INFERENCE.sampler == "ddpm" and STAGE_C_INFERENCE.cfg_rho == 0.7
    assert stage_c_shape(2, 1024, 1024) == (2, 16, 24, 24)
    assert stage_b_shape(2, 1024, 1024) == (2, 4, 256, 256)
    assert stage_c_shape(1, 768, 1536)[2:] == (18, 36)
    # switching the sampler drops DDPM's eta; None keeps values
    ddim = STAGE_C_INFERENCE.replace(sampler="ddim", cfg=None)
    assert ddim.eta is None and ddim.cfg == 4
    assert SamplingSettings(timesteps=5, cfg=None).replace(timesteps=None).timesteps == 5


def test_device_and_dtype_policy():
    from inference.models import Placement, pick_device, weights_dtype

    cfg = load_inference_config(CONFIGS / "stage_c_3b.yaml")
    assert weights_dtype(cfg, torch.device("cpu")) == torch.float32  # bf16 only on capable GPUs
    assert not Placement(torch.device("cpu"), offload=True).offload  # nothing to offload to
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_device("cuda")
