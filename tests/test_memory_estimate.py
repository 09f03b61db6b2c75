"""core.memory: exact weight/optimizer arithmetic and the activation estimate's behaviour."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from core.memory import estimate_memory, format_estimate, optimizer_state_bytes, shape_from_config

N_3B = 3_589_103_632


def test_stage_c_3b_weights_equal_params_times_bytes():
    fp32 = estimate_memory(kind="stage_c", model_version="3.6B", weight_dtype="float32", activations=False)
    assert fp32["params"]["generator"] == N_3B
    assert fp32["bytes"]["weights_trained"] == N_3B * 4
    assert fp32["bytes"]["gradients"] == N_3B * 4
    assert fp32["bytes"]["optimizer"] == N_3B * 4 * 2          # AdamW: exp_avg + exp_avg_sq


def test_lora_freezes_the_generator_in_bf16():
    est = estimate_memory(kind="stage_c", model_version="3.6B", mode="lora", lora_rank=4,
                          lora_filters=[".attn"], activations=False)
    assert est["params"]["trainable"] == 3_145_728              # 128 LoRAs, networks.md §7.1
    assert est["bytes"]["weights_frozen"] == N_3B * 2
    assert est["bytes"]["gradients"] == 3_145_728 * 4           # float32 LoRA factors only


def test_cached_run_loads_no_encoders():
    assert estimate_memory(model_version="tiny", activations=False, cached=True)["bytes"]["encoders"] == 0
    full = estimate_memory(model_version="tiny", activations=False, image_conditioning=False)
    assert "clip_vision" not in full["params"] and full["params"]["clip_text"] == 694_659_840


def test_optimizer_state_rules():
    w = torch.empty(300, 200)                  # 60,000 elements
    b = torch.empty(300)
    assert optimizer_state_bytes([w, b], "adamw") == 2 * 4 * 60_300
    assert optimizer_state_bytes([w, b], "adafactor") == (300 + 200) * 4 + 300 * 4
    # 8-bit: 2 bytes/element + 2 float32 absmax per 256-element block; small tensors stay 32-bit
    assert optimizer_state_bytes([w, b], "adamw8bit") == 2 * 60_000 + 8 * 235 + 2 * 4 * 300


def test_checkpointing_lowers_the_activation_estimate():
    for kw in ({"kind": "stage_c"}, {"kind": "stage_b"},
               {"kind": "stage_c", "mode": "lora", "lora_filters": [".attn"]},
               {"kind": "stage_c", "mode": "controlnet",
                "controlnet": {"c_in": 1, "proj_blocks": [0, 5], "bottleneck_mode": "effnet"}}):
        est = estimate_memory(model_version="tiny", batch_size=2, image_size=128, **kw)
        b = est["bytes"]
        first = first if "first" in locals() else b["activations"]   # stage_c full, batch 2
        assert 0 < b["activations_checkpointed"] < b["activations"], kw
        assert est["total_checkpointed"] < est["total"]
    big = estimate_memory(model_version="tiny", batch_size=8, image_size=128)["bytes"]["activations"]
    assert 2.5 * first < big                                   # activations grow with the batch (2 -> 8)


def test_estimate_from_a_config_and_the_table():
    cfg = SimpleNamespace(model_version="tiny", batch_size=4, image_size=128, optimizer="adafactor",
                          dtype=None, precision="auto", gradient_checkpointing=True, cache_path=None,
                          image_embed_prob=0.1, per_rank_batch=lambda ws: 4)
    fields, ckpt = shape_from_config(cfg)
    assert ckpt and fields["kind"] == "stage_c" and fields["mode"] == "full" and fields["batch_size"] == 4
    est = estimate_memory(cfg)
    table = format_estimate(est)
    print(table)
    assert "activations, gradient checkpointing" in table and "(configured)" in table
    assert est["shape"]["optimizer"] == "adafactor"
