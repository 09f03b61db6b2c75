"""Quantised frozen base (modules/quantize.py): per-layer error bounds against the dense layer, what
autograd keeps, composition with LoRA/DoRA, config checks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modules.quantize import QuantizedWeight, quantize_frozen_, quantize_weight

#: relative RMS output error bounds of one layer against the same layer in bf16 (measured on these
#: Gaussian layers, block 64 and per row alike: int8 0.49-0.50 %, float8_e4m3fn 2.5-2.6 %)
BOUNDS = {"int8": 0.01, "float8_e4m3fn": 0.04}


def _layers() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [(nn.Linear(256, 192), torch.randn(3, 7, 256)), (nn.Conv2d(48, 32, 3, padding=1), torch.randn(2, 48, 6, 6)),
            (nn.Conv2d(64, 80, 1), torch.randn(2, 64, 5, 5))]


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("block", [64, 0])
def test_layer_output_error_is_bounded(dtype, block):
    for layer, x in _layers():
        dense = layer.to(torch.bfloat16).requires_grad_(False)
        quant = copy.deepcopy(dense)
        assert quantize_frozen_(quant, dtype, block) == 1
        x = x.to(torch.bfloat16)
        ref, got = dense(x).float(), quant(x).float()
        err = float((got - ref).norm() / ref.norm())
        assert err < BOUNDS[dtype], (type(layer).__name__, err)
        assert got.dtype == ref.dtype and quant.weight.dtype == torch.bfloat16


def test_weight_error_is_within_half_a_step_of_its_block():
    w = torch.randn(8, 100)
    q = quantize_weight(w, "int8", 32)
    assert q.codes.dtype == torch.int8 and tuple(q.scales.shape) == (8, 4) and tuple(q.shape) == (8, 100)
    step = q.scales.repeat_interleave(32, dim=1)[:, :100]
    assert bool(((q.dequantize() - w).abs() <= step / 2 + 1e-7).all())


def test_autograd_keeps_the_codes_not_a_dense_copy():
    layer = nn.Linear(64, 32).requires_grad_(False)
    quantize_frozen_(layer, "int8")
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y = layer(x)
    assert saved and all(isinstance(t, QuantizedWeight) for t in saved)
    y.sum().backward()
    assert torch.allclose(x.grad, layer.weight.dequantize().sum(0).expand(4, -1))


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_lora_attaches_to_the_quantised_weights(lora_type):
    from modules.lora import apply_lora
    from modules.registry import build_model

    torch.manual_seed(0)
    model = build_model("stage_c", "tiny").requires_grad_(False)
    n = quantize_frozen_(model, "int8")
    assert n > 0 and isinstance(model.down_blocks[0][2].attention.attn.in_proj_weight, QuantizedWeight)
    loras = apply_lora(model, [".attn"], rank=2, lora_type=lora_type)
    assert loras and all(isinstance(module.lora_down, nn.Parameter) for _, module in loras)
    from tests.test_modules_stage_bc import _c_inputs

    model(**_c_inputs()).square().mean().backward()
    assert all(module.lora_up.grad is not None for _, module in loras)


def test_config_keys(tmp_path):
    from core.config import load_config
    from core.errors import UserError
    from train.train_c_lora import LoraConfig

    sets = ["checkpoint_path=/tmp/x", "output_path=/tmp/x"]
    cfg = load_config(LoraConfig, "configs/training/tiny_c_lora.yaml", sets + ["base_dtype=int8"], validate_only=True)
    assert cfg.base_dtype == "int8" and cfg.base_quant_block == 64
    for bad, match in (("base_dtype=int4", "base_dtype"), ("base_quant_block=-1", "base_quant_block")):
        with pytest.raises(UserError, match=match):
            load_config(LoraConfig, "configs/training/tiny_c_lora.yaml", sets + [bad], validate_only=True)
    with pytest.raises(UserError, match="use_fsdp"):
        load_config(LoraConfig, "configs/training/tiny_c_lora.yaml", sets + ["base_dtype=int8", "use_fsdp=true"],
                    validate_only=True)


@pytest.mark.slow  # writes the tiny inference files (~8 s) unless test_inference_pipeline did in this process
def test_inference_samples_with_a_quantised_generator(tmp_path_factory):
    from inference.errors import UserError as InferenceError
    from inference.pipeline import CascadePipeline
    from modules.quantize import QuantizedWeight
    from tests.test_inference_pipeline import CONFIGS
    from tools.make_tiny_inference_assets import write_tiny_setup

    tmp_path = tmp_path_factory.getbasetemp() / "inference_tiny"  # test_inference_pipeline's files, when written
    write_tiny_setup(tmp_path)
    dense = CascadePipeline.from_config(CONFIGS / "tiny_c.yaml", root=tmp_path, progress=False)
    quant = CascadePipeline.from_config(CONFIGS / "tiny_c.yaml", overrides=["base_dtype=int8"], root=tmp_path,
                                        progress=False)
    assert any(isinstance(p, QuantizedWeight) for p in quant.stage_c.parameters())
    assert any(isinstance(p, QuantizedWeight) for p in quant.text_model.parameters())
    a, b = (p.sample_stage_c(["a red apple"], 64, 64, generator=3, settings=p.settings_c(timesteps=2))
            for p in (dense, quant))
    assert a.shape == b.shape and float((a - b).norm() / a.norm()) < 0.1
    with pytest.raises(InferenceError, match="LoRA"):
        CascadePipeline.from_config(CONFIGS / "tiny_lora_c.yaml", overrides=["base_dtype=int8"], root=tmp_path,
                                    progress=False)
