"""LoRA file layouts: ComfyUI export names, official/ComfyUI import, merging, zero-init identity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modules.lora_formats import (
    LoraEntry, LoraFormatError, detect_layout, entries_from_named, export_comfyui, load_into_loras, merge_entries,
    named_state_dict, official_state_dict, pack_qkv, read_entries, stage_c_targets,
)
from modules.lora import apply_lora, remove_lora
from modules.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "data" / "reference"


def _comfy_names_from_manifest(filters: list[str]) -> set[str]:
    """The ComfyUI key set, derived only from the manifest and ComfyUI's documented rules: packed
    ``in_proj_weight`` -> ``to_q/to_k/to_v.weight``; a model weight ``K.weight`` -> LoRA name
    ``lora_prior_unet_`` + K with dots as underscores; three tensors per LoRA."""
    keys = json.loads((REF / "stage_c_3b.json").read_text())["state_dict_keys_in_order"]
    weights = []
    for key in keys:
        module, param = key.rsplit(".", 1)
        if not any(f in module for f in filters):
            continue
        if param == "in_proj_weight":
            weights += [f"{module}.{p}.weight" for p in ("to_q", "to_k", "to_v")]
        elif param == "weight":
            weights.append(key)
    names = set()
    for w in weights:
        stem = "lora_prior_unet_" + w[: -len(".weight")].replace(".", "_")
        names |= {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"}
    return names


def test_comfyui_export_names_match_the_3b_manifest_on_meta():
    model = build_model("stage_c", "3.6B", device="meta")
    loras = apply_lora(model, [".attn"], rank=4)
    manifest = json.loads((REF / "lora_c_3b_rank4.json").read_text())
    assert [t for t, _ in loras] == manifest["lora_targets_in_order"]
    exported = export_comfyui(entries_from_named(named_state_dict(loras, alpha=1.0)))
    assert set(exported) == _comfy_names_from_manifest([".attn"])
    assert len(exported) == 3 * (64 * 3 + 64)
    down = exported["lora_prior_unet_down_blocks_0_2_attention_attn_to_k.lora_down.weight"]
    up = exported["lora_prior_unet_down_blocks_0_2_attention_attn_to_k.lora_up.weight"]
    assert tuple(down.shape) == (4, 2048) and tuple(up.shape) == (2048, 4)


def _tiny_with_random_lora(rank=2, alpha=1.0, filters=(".attn",), seed=0):
    torch.manual_seed(seed)
    model = build_model("stage_c", "tiny").eval()
    loras = apply_lora(model, list(filters), rank=rank, alpha=alpha)
    with torch.no_grad():
        for _, lora in loras:
            lora.lora_down.normal_(0, 0.3)
    return model, loras


def _inputs(seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 16, 4, 4, generator=g), torch.rand(n, generator=g),
            torch.randn(n, 77, 32, generator=g), torch.randn(n, 1, 32, generator=g), torch.randn(n, 1, 24, generator=g))


def _base_state_dict(model):
    """The plain (official) state dict behind parametrized weights."""
    import copy

    plain = copy.deepcopy(model)
    remove_lora(plain, leave_parametrized=False)
    return plain.state_dict()


def test_zero_init_lora_leaves_outputs_identical():
    torch.manual_seed(0)
    model = build_model("stage_c", "tiny").eval()
    x = _inputs()
    with torch.no_grad():
        before = model(*x)
        apply_lora(model, [".attn"], rank=4)
        after = model(*x)
    assert torch.equal(before, after)
    # the other convention (zero lora_up, random lora_down) is an identity too
    loras = [lora for _, lora in apply_lora(build_model("stage_c", "tiny").eval(), [".attn"], rank=4)]
    for lora in loras:
        with torch.no_grad():
            lora.lora_up.zero_()
            lora.lora_down.normal_()
        delta = lora(torch.zeros(lora.lora_up.shape[0], lora.lora_down.shape[1]))
        assert not delta.any()


@pytest.mark.parametrize("filters", [(".attn",), (".attn", "channelwise.4", "embedding.1", "kv_mapper.1", "depthwise")])
def test_merge_equals_unmerged_and_comfyui_roundtrip(filters):
    model, loras = _tiny_with_random_lora(alpha=3.0, filters=filters)
    x = _inputs()
    with torch.no_grad():
        expected = model(*x)
    named = named_state_dict(loras, alpha=3.0)
    base = _base_state_dict(model)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    for entries in (entries_from_named(named),
                    read_entries(export_comfyui(entries_from_named(named), shapes), shapes, source="comfy")):
        merged = merge_entries(base, entries)
        plain = build_model("stage_c", "tiny").eval()
        plain.load_state_dict(merged)
        with torch.no_grad():
            torch.testing.assert_close(plain(*x), expected, rtol=1e-5, atol=1e-5)


def test_official_and_comfyui_files_load_back_into_trainable_loras():
    model, loras = _tiny_with_random_lora(alpha=2.0)
    named = named_state_dict(loras, alpha=2.0)
    targets = [t for t, _ in loras]
    shapes = {k: tuple(v.shape) for k, v in _base_state_dict(model).items()}
    official = official_state_dict(named, targets)
    assert detect_layout(official) == "official"
    comfy = export_comfyui(entries_from_named(named), shapes)
    assert detect_layout(comfy) == "comfyui"
    for sd in (official, comfy, named):
        fresh_model, fresh = _tiny_with_random_lora(alpha=2.0, seed=5)
        load_into_loras(fresh, read_entries(sd, shapes, official_targets=targets), alpha=2.0)
        for (_, a), (_, b) in zip(loras, fresh):
            torch.testing.assert_close(b.lora_down, a.lora_down)
            torch.testing.assert_close(b.lora_up, a.lora_up)


def test_official_positional_targets_of_the_3b_manifest():
    manifest = json.loads((REF / "lora_c_3b_rank4.json").read_text())
    targets, _ = stage_c_targets("3.6B", [".attn"], rank=4)
    assert targets == manifest["lora_targets_in_order"]
    with pytest.raises(LoraFormatError, match="positional"):
        read_entries({"weights.0.lora_down": torch.zeros(4, 8), "weights.0.lora_up": torch.zeros(8, 4)},
                     [], official_targets=targets)


def test_qkv_with_different_downs_merges_but_does_not_repack():
    target = "a.attn.in_proj_weight"
    downs = [torch.randn(2, 4) for _ in range(3)]
    entries = [LoraEntry(target, downs[b], torch.randn(4, 2), 2.0, block=b) for b in range(3)]
    with pytest.raises(LoraFormatError, match="different lora_down"):
        pack_qkv(entries)
    base = {target: torch.zeros(12, 4)}
    merged = merge_entries(base, entries)[target]
    for b in range(3):
        torch.testing.assert_close(merged[4 * b:4 * (b + 1)], entries[b].up @ downs[b])
    same = [LoraEntry(target, downs[0], torch.randn(4, 2), a, block=b) for b, a in enumerate((1.0, 2.0, 4.0))]
    packed = pack_qkv(same)[0]
    torch.testing.assert_close(merge_entries(base, [packed])[target], merge_entries(base, same)[target])


def test_unknown_comfyui_names_and_rank_mismatch_are_format_errors():
    model, loras = _tiny_with_random_lora(rank=2)
    shapes = {k: tuple(v.shape) for k, v in _base_state_dict(model).items()}
    with pytest.raises(LoraFormatError, match="match no Stage C module"):
        read_entries({"lora_prior_unet_nope.lora_down.weight": torch.zeros(2, 2),
                      "lora_prior_unet_nope.lora_up.weight": torch.zeros(2, 2)}, shapes)
    _, rank4 = _tiny_with_random_lora(rank=4)
    with pytest.raises(LoraFormatError, match="set rank to 4"):
        load_into_loras(loras, entries_from_named(named_state_dict(rank4, 1.0)), alpha=1.0)


def test_filters_matching_nothing_name_existing_modules():
    with pytest.raises(LoraFormatError, match="module names look like"):
        stage_c_targets("tiny", [".nothing_like_this"])
