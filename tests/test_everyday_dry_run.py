"""Issue 26 point 6: the dry run's memory estimate covers every optimizer and the configured
ControlNet, says which world size it is for, and counts a tiny CLIP as tiny."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from core.cli import _estimate_world_size
from core.config import load_config
from core.memory import OPTIMIZERS, optimizer_state_bytes
from train.memory_specs import _run_fields
from train.train_c_controlnet import StageCControlNetTrainer


def test_every_configurable_optimizer_has_a_state_size():
    from core.optim import OptimConfig
    import typing

    choices = typing.get_args(typing.get_type_hints(OptimConfig)["optimizer"])
    assert set(choices) <= set(OPTIMIZERS)
    p = torch.empty(10, 10)
    assert optimizer_state_bytes([p], "prodigy") == 4 * 400  # exp_avg, exp_avg_sq, s, p0


def test_each_controlnet_config_is_estimated_with_its_own_network():
    specs = {}
    for variant in ("canny", "sr"):
        cfg = load_config(StageCControlNetTrainer.Config, f"configs/training/controlnet_c_3b_{variant}.yaml",
                          validate_only=True)
        specs[variant] = StageCControlNetTrainer.memory_spec(cfg, 64).details["controlnet"]
    assert specs["canny"]["c_in"] == 1 and specs["canny"]["bottleneck_mode"] in (None, "effnet")
    assert specs["sr"]["c_in"] == 16 and specs["sr"]["bottleneck_mode"] == "large"
    assert specs["sr"]["input_downscale"] == 32 and specs["canny"]["input_downscale"] == 1


def test_a_many_gpu_batch_is_estimated_per_gpu_at_the_world_size_it_is_written_for(monkeypatch, capsys):
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    cfg = SimpleNamespace(batch_size=512, grad_accum_steps=1)
    assert _estimate_world_size(cfg, 1) == 64
    assert "written for many GPUs" in capsys.readouterr().out
    assert _estimate_world_size(SimpleNamespace(batch_size=16, grad_accum_steps=4), 1) == 1
    monkeypatch.setenv("WORLD_SIZE", "1")  # a launcher said 1: its word counts
    assert _estimate_world_size(cfg, 1) == 1


def test_a_local_tiny_clip_is_counted_at_its_size(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2,
                                                    "intermediate_size": 128, "projection_dim": 32}))
    cfg = SimpleNamespace(batch_size=1, clip_text_model_name=str(folder), clip_image_model_name="openai/x")
    f = _run_fields(cfg)
    assert f["clip_text"]["width"] == 32 and f["clip_vision"] == {}
    from train.memory_specs import clip_text_params

    assert clip_text_params(**f["clip_text"]) < 2_000_000 < clip_text_params()
