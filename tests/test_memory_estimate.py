"""core.memory: exact weight/optimizer arithmetic and the activation estimate's behaviour, on the
specs of the four jobs (train/memory_specs.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from core.errors import UserError
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
    assert est["params"]["trainable"] == 3_145_728              # 128 LoRAs (docs/OFFICIAL.md, LoRA and ReToken)
    assert est["bytes"]["weights_frozen"] == N_3B * 2
    assert est["bytes"]["gradients"] == 3_145_728 * 4           # float32 LoRA factors only


def test_cached_run_loads_no_encoders():
    assert estimate_memory(stage_c_spec(run_cfg(cache_path="cache")), activations=False)["bytes"]["encoders"] == 0
    # the job loads the CLIP vision tower whatever image_embed_prob says, so the estimate counts it
    full = estimate_memory(stage_c_spec(run_cfg(image_embed_prob=0.0)), activations=False)
    assert full["params"]["clip_vision"] == 303_966_208 and full["params"]["clip_text"] == 694_659_840
    assert clip_text_params() == 694_659_840 and clip_vision_params() == 303_966_208


def test_stage_a_is_counted_in_float32():
    """The Stage B job registers Stage A uncast (float32) while the other encoders take frozen_dtype."""
    est = estimate_memory(stage_b_spec(run_cfg(model_version="tiny")), activations=False)
    p = est["params"]
    assert est["bytes"]["encoders"] == (p["clip_text"] + p["effnet"]) * 2 + p["stage_a"] * 4


def fsdp_shard_bytes(module: nn.Module, world_size: int, element_size: Optional[int] = None) -> int:
    """Bytes one rank keeps of ``module``'s parameters under FSDP2: ceil(dim0 / ws) rows of each."""
    total = 0
    for p in module.parameters():
        shape = tuple(p.shape) or (1,)
        rows = -(-shape[0] // world_size)
        total += rows * math.prod(shape[1:]) * (element_size or p.element_size())
    return total


def test_fsdp_estimate_is_per_rank_and_sharded():
    """world_size 8 + use_fsdp: the per-rank micro-batch is 512 / 8 / grad_accum, the generator's
    weights, gradients and AdamW states are the FSDP2 shards (ceil(dim0 / 8) rows, about full / 8),
    the encoders stay whole."""
    from modules.registry import build_model

    cfg = run_cfg(model_version="3.6B", batch_size=512, grad_accum_steps=2, use_fsdp=True)
    one = estimate_memory(stage_c_spec(cfg), activations=False)
    spec = stage_c_spec(cfg, 8)
    assert spec.batch_size == 512 // 8 // 2 and spec.world_size == 8 and list(spec.fsdp_networks) == ["generator"]
    assert "CUDA GPU with bf16" in spec.device and "frozen_dtype unset: bfloat16" in spec.device
    est = estimate_memory(spec, activations=False)
    b = est["bytes"]
    shard = fsdp_shard_bytes(build_model("stage_c", "3.6B", device="meta"), 8, element_size=4)
    assert b["weights_trained"] == b["gradients"] == shard
    assert b["optimizer"] == 2 * shard
    assert N_3B * 4 / 8 <= shard < N_3B * 4 / 8 * 1.005              # padding: under 0.5 %
    assert b["encoders"] == one["bytes"]["encoders"] and b["weights_frozen"] == one["bytes"]["weights_frozen"]
    assert 0 < b["parallel"] < one["bytes"]["weights_trained"] / 8    # root group + two blocks, bf16
    assert est["shape"]["parallel"] == "fsdp" and est["shape"]["world_size"] == 8
    assert one["shape"]["parallel"] == "single" and one["bytes"]["parallel"] == 0
    table = format_estimate(est)
    assert "per-rank micro-batch 32" in table and "FSDP" in table and "sharded 8 ways" in table
    # DDP: full copies on every rank, plus the gradient buckets; the micro-batch is still per rank
    ddp = estimate_memory(stage_c_spec(run_cfg(model_version="3.6B", batch_size=512, use_fsdp=False), 8),
                          activations=False)
    assert ddp["bytes"]["weights_trained"] == N_3B * 4 and ddp["bytes"]["parallel"] == N_3B * 4
    assert ddp["shape"]["batch_size"] == 64 and ddp["shape"]["parallel"] == "ddp"
    # use_fsdp on one process trains unsharded, so the estimate does not shard either
    assert estimate_memory(stage_c_spec(cfg, 1), activations=False)["bytes"] == one["bytes"]


def test_fsdp_shards_the_frozen_base_of_adapter_runs():
    from modules.registry import build_model

    gen = build_model("stage_c", "3.6B", device="meta")
    for make in (lora_spec, controlnet_spec):
        cfg = run_cfg(model_version="3.6B", batch_size=64, use_fsdp=True, rank=4, module_filters=[".attn"])
        spec = make(cfg, 4)
        est = estimate_memory(spec, activations=False)
        assert est["shape"]["batch_size"] == 16
        with FakeTensorMode():   # buffers (the ControlNet's norms) stay whole on every rank
            buffers = sum(b.numel() * b.element_size() for b in spec.build().buffers())
        # the bf16 base, sharded 4 ways, is the frozen part
        assert est["bytes"]["weights_frozen"] == fsdp_shard_bytes(gen, 4, element_size=2) + buffers, make
    with pytest.raises(UserError, match="divisible"):  # core.config.per_rank_batch, the one rule
        stage_c_spec(run_cfg(batch_size=6), 4)


def test_fsdp_arithmetic_of_a_generic_spec():
    """Shards, optimizer states and the all-gather buffers of a spec core.memory knows nothing about."""
    def build() -> nn.Module:
        return nn.ModuleDict({"net": nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 63)),
                              "head": nn.Linear(8, 8)})

    spec = MemorySpec(title="mlp", build=build, forward=lambda m: m["net"](torch.empty(2, 64)).pow(2).mean(),
                      batch_size=2, image_size=(1, 1), unit_types=(nn.Linear,), autocast=True, world_size=3,
                      fsdp_networks=["net"])
    b = estimate_memory(spec, activations=False)["bytes"]
    rows = {"w0": 86 * 64, "b0": 86, "w1": 21 * 256, "b1": 21}          # ceil(256/3), ceil(63/3) rows
    head = 8 * 8 + 8                                                     # not sharded
    assert b["weights_trained"] == b["gradients"] == (sum(rows.values()) + head) * 4
    assert b["optimizer"] == 2 * b["weights_trained"]
    # two largest units in bf16 (both Linear layers of net) + the largest unit's float32 gradients
    units = [(256 * 64 + 256), (63 * 256 + 63)]
    assert b["parallel"] == 2 * sum(units) + 4 * max(units)


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
        spec.transient = None  # the encoders' forward (seconds) sets no activation figure
        est = estimate_memory(spec)
        b = est["bytes"]
        first = b["activations"] if first is None else first   # stage_c full, batch 2
        assert 0 < b["activations_checkpointed"] < b["activations"], spec.title
        # the peak is the largest of backward, optimizer step and encoders: checkpointing lowers
        # it where the activations set it (LoRA: tiny gradients and optimizer step)
        assert est["total_checkpointed"] <= est["total"]
        if spec.details["mode"] == "lora":
            assert est["total_checkpointed"] < est["total"], spec.title
    big_spec = stage_c_spec(run_cfg(batch_size=8, image_size=128))
    big_spec.transient = None
    big = estimate_memory(big_spec)["bytes"]["activations"]
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
    assert table.startswith("# memory estimate per rank: stage_c tiny full, per-rank micro-batch 4, 128x128, "
                            "weights float32")
    assert "\n# 1 process" in table and "\n# target device: CUDA GPU with bf16" in table
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


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_lora_parameter_count_is_what_float32_lora_trains(lora_type):
    """The dry run's count (no build) and the estimate's adapters (built) are the same parameters."""
    from modules.lora_formats import stage_c_targets
    from modules.registry import build_model
    from train.memory_specs import float32_lora, lora_parameter_count

    targets, shapes = stage_c_targets("tiny", [".attn"])
    params = float32_lora(build_model("stage_c", "tiny").requires_grad_(False), [".attn"], 3, lora_type)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert sum(p.numel() for p in params) == lora_parameter_count({t: shapes[t] for t in targets}, 3, lora_type)
