"""LoRA files at inference: every layout merges to the same weights as modules.lora's LoRA."""
import copy

import pytest
import torch

from inference.errors import UserError
from inference.lora import MergedLora, merge_lora, read_lora
from modules.lora import lora_targets
from modules.lora_formats import detect_layout

RANK = 2


@pytest.fixture(scope="module")
def model():
    from modules.registry import build_model

    torch.manual_seed(0)
    net = build_model("stage_c", "tiny")
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return net.eval()


@pytest.fixture(scope="module")
def official(model):
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for i, target in enumerate(lora_targets(model, [".attn"])):
        w = model.get_parameter(target)
        sd[f"weights.{i}.lora_down"] = torch.randn(RANK, w.size(1), generator=gen)
        sd[f"weights.{i}.lora_up"] = torch.randn(w.size(0), RANK, generator=gen)
    return sd


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return dict(x=torch.randn(1, 16, 3, 3, generator=gen), r=torch.tensor([0.5]),
                clip_text=torch.randn(1, 77, 32, generator=gen),
                clip_text_pooled=torch.randn(1, 1, 32, generator=gen),
                clip_img=torch.randn(1, 1, 24, generator=gen))


def test_official_order_matches_modules_lora(model):
    from modules.lora import apply_lora

    twin = copy.deepcopy(model)
    targets = [name for name, _ in apply_lora(twin, [".attn"], rank=RANK)]
    assert lora_targets(model, [".attn"]) == targets
    assert targets[0].endswith("out_proj.weight") and targets[1].endswith("in_proj_weight")


def test_merge_equals_parametrized_lora(model, official):
    """The merged weights give the output of modules.lora's parametrization (scale 1/rank)."""
    from modules.lora import apply_lora, load_lora_state_dict_official

    twin = copy.deepcopy(model)
    loras = apply_lora(twin, [".attn"], rank=RANK)
    load_lora_state_dict_official(loras, official)
    merged = copy.deepcopy(model)
    merge_lora(merged, read_lora(official, merged, [".attn"], RANK))
    with torch.no_grad():
        torch.testing.assert_close(merged(**_inputs()), twin(**_inputs()), rtol=1e-4, atol=1e-5)


def test_named_and_comfy_layouts_equal_official(model, official):
    """Files in the trainer's named layout and its ComfyUI export merge to the same weights."""
    from modules.lora_formats import entries_from_named, export_comfyui

    named = {}
    for i, target in enumerate(lora_targets(model, [".attn"])):
        named[f"{target}.lora_down"] = official[f"weights.{i}.lora_down"]
        named[f"{target}.lora_up"] = official[f"weights.{i}.lora_up"]
        named[f"{target}.alpha"] = torch.tensor(1.0)
    comfy = export_comfyui(entries_from_named(named))
    assert any(k.endswith("_to_q.lora_down.weight") for k in comfy)
    assert (detect_layout(official), detect_layout(named), detect_layout(comfy)) == \
        ("official", "named", "comfyui")
    results = []
    for sd in (official, named, comfy):
        twin = copy.deepcopy(model)
        merge_lora(twin, read_lora(sd, twin, [".attn"], RANK))
        results.append(twin.state_dict())
    for other in results[1:]:
        for key, value in results[0].items():
            torch.testing.assert_close(other[key], value)


def test_strength_zero_is_exact_and_switchable(model, official):
    twin = copy.deepcopy(model)
    merged = MergedLora(twin, read_lora(official, twin, [".attn"], RANK))
    merged.set_strength(1.0)
    key = lora_targets(model, [".attn"])[0]
    assert not torch.equal(twin.get_parameter(key), model.get_parameter(key))
    merged.set_strength(0.0)
    for (name, a), b in zip(twin.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_mismatches_are_user_errors(model, official):
    with pytest.raises(UserError, match="rank"):
        read_lora(official, model, [".attn"], rank=8)
    with pytest.raises(UserError, match="module_filters"):
        read_lora(official, model, [".attn", "mapper"], rank=RANK)
    with pytest.raises(UserError, match="not a parameter"):
        bad = {"nope.weight.lora_down": torch.zeros(2, 3), "nope.weight.lora_up": torch.zeros(3, 2)}
        merge_lora(model, read_lora(bad, model))
    with pytest.raises(UserError, match="no LoRA keys"):
        read_lora({"something": torch.zeros(1)}, model)
