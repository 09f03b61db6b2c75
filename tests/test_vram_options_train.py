"""The low-VRAM options through the real LoRA job (tiny Stage C, CPU): a run with base_dtype int8,
gradient_checkpointing 2, fused_backward and offload_blocks gives the same losses and LoRA as the
same run without fused backward and offload (bitwise), and an interrupted run resumes exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers.adapter_assets import cli_args, losses

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/training/tiny_c_lora.yaml")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
LOW_VRAM = dict(base_dtype="int8", gradient_checkpointing=2, fused_backward=True, offload_blocks=2)
COMMON = dict(updates=4, save_every=2, lr=1.0e-2, rank=2, grad_clip=0, train_tokens=None, export_comfyui=False)


def _run(assets, root, name, **extra):
    from train.train_c_lora import StageCLoraTrainer

    assert StageCLoraTrainer.main(cli_args(CONFIG, assets, root, experiment_id=name, **{**COMMON, **extra})) == 0
    return root / "ck" / name


def test_low_vram_options_same_losses_and_exact_resume(adapter_assets, tmp_path):
    low = _run(adapter_assets, tmp_path, "low", **LOW_VRAM)
    plain = _run(adapter_assets, tmp_path, "plain", **{**LOW_VRAM, "fused_backward": False, "offload_blocks": 0})
    assert losses(low) == losses(plain)
    a, b = load_file(low / "lora.safetensors"), load_file(plain / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = yaml.safe_load((low / "config.yaml").read_text())
    assert {k: saved[k] for k in LOW_VRAM} == LOW_VRAM

    _run(adapter_assets, tmp_path, "resumed", **{**LOW_VRAM, "updates": 2})
    resumed = _run(adapter_assets, tmp_path, "resumed", **LOW_VRAM)
    la, lr_ = losses(low), losses(resumed)
    assert [la[s] for s in (3, 4)] == [lr_[s] for s in (3, 4)]
    c = load_file(resumed / "lora.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
