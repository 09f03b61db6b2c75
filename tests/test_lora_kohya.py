"""kohya's ``lora_unet_`` LoRA layout: names, exact round trip ours -> kohya -> ours, loading in
training (``lora_checkpoint_path`` code) and inference, the export tool's ``--format`` and warnings."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.lora import apply_lora_file
from modules.lora import apply_lora, remove_lora
from modules.lora_formats import (
    KOHYA_PREFIX, LoraFormatError, detect_layout, entries_from_named, export_comfyui, export_kohya, load_into_loras,
    named_state_dict, pack_qkv, read_entries, unloadable_targets,
)
from modules.registry import build_model

FILTERS = [".attn", "channelwise.4", "depthwise"]


def _tiny(seed=0, filters=FILTERS, alpha=3.0):
    torch.manual_seed(seed)
    model = build_model("stage_c", "tiny").eval()
    loras = apply_lora(model, list(filters), rank=2, alpha=alpha)
    with torch.no_grad():
        for _, lora in loras:
            lora.lora_down.normal_(0, 0.3)
    return model, loras


def _shapes(model):
    plain = copy.deepcopy(model)
    remove_lora(plain, leave_parametrized=False)
    return plain, {k: tuple(v.shape) for k, v in plain.state_dict().items()}


def test_kohya_names_are_comfyui_names_with_kohya_prefix():
    model, loras = _tiny()
    _, shapes = _shapes(model)
    entries = entries_from_named(named_state_dict(loras, alpha=3.0))
    comfy, kohya = export_comfyui(entries, shapes), export_kohya(entries, shapes)
    assert {KOHYA_PREFIX + k[len("lora_prior_unet_"):] for k in comfy} == set(kohya)
    for k, v in comfy.items():
        assert torch.equal(kohya[KOHYA_PREFIX + k[len("lora_prior_unet_"):]], v)
    assert "lora_unet_down_blocks_0_2_attention_attn_to_v.lora_up.weight" in kohya
    assert detect_layout(kohya) == "kohya"
    with pytest.raises(LoraFormatError, match="mixes"):
        detect_layout({**comfy, **kohya})


def test_ours_to_kohya_to_ours_is_exact():
    model, loras = _tiny()
    _, shapes = _shapes(model)
    named = named_state_dict(loras, alpha=3.0)
    back = pack_qkv(read_entries(export_kohya(entries_from_named(named), shapes), shapes, source="kohya.safetensors"))
    fresh_model, fresh = _tiny(seed=7)
    load_into_loras(fresh, back, alpha=3.0, source="kohya.safetensors")
    again = named_state_dict(fresh, alpha=3.0)
    assert again.keys() == named.keys()
    for k in named:
        assert torch.equal(again[k], named[k]), k


def test_unknown_kohya_name_is_a_format_error():
    with pytest.raises(LoraFormatError, match="kohya LoRA names match no Stage C module"):
        read_entries({"lora_unet_nope.lora_down.weight": torch.zeros(2, 4),
                      "lora_unet_nope.lora_up.weight": torch.zeros(4, 2)}, ["a.weight"], source="x.safetensors")


def test_depthwise_targets_are_named_per_tool():
    model, loras = _tiny()
    _, shapes = _shapes(model)
    targets = [t for t, _ in loras]
    depthwise = [t for t in targets if "depthwise" in t]
    assert depthwise and unloadable_targets(targets, shapes, "kohya") == {"kohya": depthwise, "OneTrainer": depthwise}
    assert unloadable_targets(targets, shapes, "comfyui") == {"OneTrainer": depthwise}
    assert unloadable_targets([t for t in targets if ".attn" in t], shapes, "kohya") == {}


def test_export_tool_kohya_format_warns_and_inference_merges_it(tmp_path, capsys):
    from tools.lora_export import main as export_main

    model, loras = _tiny()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g), torch.randn(2, 77, 32, generator=g),
         torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 24, generator=g))
    with torch.no_grad():
        expected = model(*x)
    plain, _ = _shapes(model)
    src, out = tmp_path / "lora.safetensors", tmp_path / "kohya.safetensors"
    save_file(named_state_dict(loras, alpha=3.0), str(src),
              metadata={"model_version": "tiny", "module_filters": '[".attn", "channelwise.4", "depthwise"]'})
    assert export_main([str(src), "--out", str(out), "--format", "kohya"]) == 0
    err = capsys.readouterr().err
    assert "warning: kohya cannot load" in err and "warning: OneTrainer cannot load" in err
    assert "down_blocks.0.0.depthwise.weight" in err
    assert detect_layout(load_file(str(out))) == "kohya"
    with torch.no_grad():
        apply_lora_file(plain, str(out))
        torch.testing.assert_close(plain(*x), expected, rtol=1e-5, atol=1e-5)
