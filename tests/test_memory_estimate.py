"""core.memory: exact weight/optimizer arithmetic and the activation estimate's behaviour, on the
specs of the four jobs (train/memory_specs.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.memory import MemorySpec, estimate_memory, format_estimate, optimizer_state_bytes
from train.memory_specs import clip_text_params, clip_vision_params, controlnet_spec, lora_spec, stage_b_spec, stage_c_spec

N_3B = 3_589_103_632


def run_cfg(**kw) -> SimpleNamespace:
    """A job config with the keys the specs read (the job defaults unless given)."""
    base = dict(model_version="tiny", batch_size=4, image_size=1024, optimizer="adamw", dtype=None, frozen_dtype=None,
                precision="auto", gradient_checkpointing=False, cache_path=None, image_embed_prob=0.1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_stage_c_3b_weights_equal_params_times_bytes():
    fp32 = estimate_memory(stage_c_spec(run_cfg(model_version="3.6B", dtype="float32")), activations=False)
    assert fp32["params"]["generator"] == N_3B
    assert fp32["bytes"]["weights_trained"] == N_3B * 4
    assert fp32["bytes"]["gradients"] == N_3B * 4
    assert fp32["bytes"]["optimizer"] == N_3B * 4 * 2          # AdamW: exp_avg + exp_avg_sq


def test_lora_freezes_the_generator_in_bf16():
    est = estimate_memory(lora_spec(run_cfg(model_version="3.6B", rank=4, module_filters=[".attn"])), activations=False)
    assert est["params"]["trainable"] == 3_145_728              # 128 LoRAs, networks.md §7.1
    assert est["bytes"]["weights_frozen"] == N_3B * 2
    assert est["bytes"]["gradients"] == 3_145_728 * 4           # float32 LoRA factors only


def test_cached_run_loads_no_encoders():
    assert estimate_memory(stage_c_spec(run_cfg(cache_path="cache")), activations=False)["bytes"]["encoders"] == 0
    full = estimate_memory(stage_c_spec(run_cfg(image_embed_prob=0.0)), activations=False)
    assert "clip_vision" not in full["params"] and full["params"]["clip_text"] == 694_659_840
    assert clip_text_params() == 694_659_840 and clip_vision_params() == 303_966_208


def test_optimizer_state_rules():
    w = torch.empty(300, 200)                  # 60,000 elements
    b = torch.empty(300)
    assert optimizer_state_bytes([w, b], "adamw") == 2 * 4 * 60_300
    assert optimizer_state_bytes([w, b], "adafactor") == (300 + 200) * 4 + 300 * 4
    # 8-bit: 2 bytes/element + 2 float32 absmax per 256-element block; small tensors stay 32-bit
    assert optimizer_state_bytes([w, b], "adamw8bit") == 2 * 60_000 + 8 * 235 + 2 * 4 * 300


def test_checkpointing_lowers_the_activation_estimate():
    small = dict(batch_size=2, image_size=128)
    specs = [stage_c_spec(run_cfg(**small)), stage_b_spec(run_cfg(**small)),
             lora_spec(run_cfg(module_filters=[".attn"], **small)),
             controlnet_spec(run_cfg(**small), controlnet={"c_in": 1, "proj_blocks": [0, 5], "bottleneck_mode": "effnet"})]
    first = None
    for spec in specs:
        est = estimate_memory(spec)
        b = est["bytes"]
        first = b["activations"] if first is None else first   # stage_c full, batch 2
        assert 0 < b["activations_checkpointed"] < b["activations"], spec.title
        assert est["total_checkpointed"] < est["total"]
    big = estimate_memory(stage_c_spec(run_cfg(batch_size=8, image_size=128)))["bytes"]["activations"]
    assert 2.5 * first < big                                   # activations grow with the batch (2 -> 8)


def test_estimate_from_a_config_and_the_table():
    cfg = SimpleNamespace(model_version="tiny", batch_size=4, image_size=128, optimizer="adafactor",
                          dtype=None, precision="auto", gradient_checkpointing=True, cache_path=None,
                          image_embed_prob=0.1, per_rank_batch=lambda ws: 4)
    spec = stage_c_spec(cfg)
    assert spec.gradient_checkpointing and spec.batch_size == 4 and spec.details["mode"] == "full"
    assert spec.details["kind"] == "stage_c" and spec.image_size == (128, 128)
    est = estimate_memory(spec)
    table = format_estimate(est)
    print(table)
    assert table.startswith("# memory estimate: stage_c tiny full, per-GPU batch 4, 128x128, weights float32")
    assert "activations, gradient checkpointing" in table and "(configured)" in table
    assert "weights (frozen generator/cnet)" in table
    assert est["shape"]["optimizer"] == "adafactor"


def test_the_job_configs_give_specs():
    """The specs read the jobs' real config dataclasses (as load_config returns them)."""
    from pathlib import Path

    from core.config import load_config
    from train.train_c_lora import LoraConfig

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(LoraConfig, str(root / "configs/training/tiny_c_lora.yaml"), validate_only=True)
    spec = lora_spec(cfg)
    assert spec.details["lora_rank"] == cfg.rank and spec.details["lora_filters"] == list(cfg.module_filters)
    assert spec.batch_size == cfg.per_rank_batch(1) and spec.image_size == (cfg.image_size, cfg.image_size)
    assert estimate_memory(spec, activations=False)["params"]["trainable"] > 0


def test_a_generic_spec():
    """core.memory knows no network: a two-layer MLP spec, checkpointing per Linear."""
    def build() -> nn.Module:
        net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        net[0].requires_grad_(False)
        return net

    spec = MemorySpec(title="mlp", build=build, forward=lambda net: net(torch.empty(8, 64)).pow(2).mean(),
                      batch_size=8, image_size=(1, 1), unit_types=(nn.Linear,), frozen={"table": (1000, "float32")},
                      autocast=False)
    est = estimate_memory(spec)
    assert est["bytes"]["weights_trained"] == (256 * 64 + 64) * 4
    assert est["bytes"]["weights_frozen"] == (64 * 256 + 256) * 4
    assert est["bytes"]["encoders"] == 4000 and est["params"]["table"] == 1000
    assert est["bytes"]["optimizer"] == 2 * (256 * 64 + 64) * 4
    assert est["bytes"]["activations"] > 0
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(MemorySpec(title="x", build=build, forward=spec.forward, batch_size=1, image_size=(1, 1),
                                   optimizer="sgd"))
