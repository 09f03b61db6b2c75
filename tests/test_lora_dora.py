"""DoRA (``lora_type: dora``): init == base, merged == attached, the ComfyUI export against
ComfyUI's own loading math, the named layout, config checks, and a tiny run that resumes exactly.

ComfyUI's DoRA loading, re-implemented below from its source (comfyanonymous/ComfyUI at commit
9c0cf36cd7964978850fd40f8cf76ac2cf9f9e15):
* ``comfy/lora.py`` ``load_lora``: per LoRA name ``x`` it reads ``x.alpha`` (``.item()``),
  ``x.dora_scale`` (tensor, as stored) and hands both to the adapter;
* ``comfy/weight_adapter/lora.py`` ``LoRAAdapter``: ``x.lora_up.weight`` (mat1) and
  ``x.lora_down.weight`` (mat2); ``calculate_weight``: ``alpha = alpha / mat2.shape[0]``,
  ``lora_diff = mm(mat1.flatten(1), mat2.flatten(1)).reshape(weight.shape)``, then, with a
  dora_scale, ``weight_decompose``;
* ``comfy/weight_adapter/base.py`` ``weight_decompose``: ``weight_calc = weight + alpha *
  lora_diff``; when ``dora_scale.shape[0] == weight.shape[0]`` (output axis) the norm is the
  BASE weight's per row ``weight.reshape(out, -1).norm(dim=1)`` reshaped (out, 1, ...), else the
  adapted weight's per input column (1, in, ...); ``+ finfo(weight.dtype).eps``;
  ``weight_calc *= dora_scale / norm``; strength s != 1: ``weight + s * (weight_calc - weight)``.
  ComfyUI patches in float32 (the model patcher casts the weight before calculate_weight).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers.adapter_assets import run_and_resume

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

FILTERS = [".attn", "depthwise", "embedding.1"]  # packed in_proj, out_proj, 3x3 and 1x1 convs


def _inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 2, 2, generator=g), torch.rand(2, generator=g), torch.randn(2, 77, 32, generator=g),
            torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 24, generator=g))


def _base(seed: int = 0):
    from modules.registry import build_model

    torch.manual_seed(seed)
    model = build_model("stage_c", "tiny").eval()
    torch.nn.init.xavier_uniform_(model.clf[1].weight)  # a fresh Stage C's output conv is zero
    return model


@torch.no_grad()
def _trained_dora(seed: int = 0):
    """``(base state dict, model with DoRAs whose down/up/magnitude are all non-trivial, loras)``."""
    from modules.lora import apply_lora

    model = _base(seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    loras = apply_lora(model, FILTERS, rank=2, alpha=2.0, lora_type="dora")
    g = torch.Generator().manual_seed(seed + 1)
    for _, lora in loras:
        lora.lora_down.normal_(0, 0.3, generator=g)
        lora.lora_up.normal_(0, 0.3, generator=g)
        lora.magnitude.mul_(1 + 0.2 * torch.rand(lora.magnitude.shape, generator=g))
    return base, model, loras


def _effective(model, target: str) -> torch.Tensor:
    owner, attr = target.rsplit(".", 1)
    return getattr(model.get_submodule(owner), attr).detach()


# ------------------------------------------------------------------------------------------------
def test_dora_at_init_equals_the_base_model_bitwise():
    from modules.lora import DoRA, apply_lora

    for dtype in (torch.float32, torch.bfloat16):
        model = _base().to(dtype)
        x = [t.to(dtype) for t in _inputs()]
        with torch.no_grad():
            ref = model(*x)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        loras = apply_lora(model, FILTERS, rank=2, lora_type="dora")
        for _, lora in loras:
            lora.float()  # as the trainer keeps them
        assert all(isinstance(lora, DoRA) for _, lora in loras)
        assert {len(base[t].shape) for t, _ in loras} == {2, 4}
        for target, lora in loras:
            assert lora.magnitude.dtype == torch.float32 and lora.magnitude.shape == base[target].shape[:1]
            assert torch.equal(_effective(model, target), base[target]), target
        with torch.no_grad():
            assert torch.equal(model(*x), ref), dtype


def test_dora_math_is_the_weight_decomposition():
    from modules.lora import dora_weight, row_norms

    _, model, loras = _trained_dora()
    for target, lora in loras:
        owner, attr = target.rsplit(".", 1)
        w0 = model.get_submodule(owner).parametrizations[attr].original.detach()
        v = w0 + (lora.lora_up @ lora.lora_down * lora.scale).detach().view(
            w0.shape[:2] + (1,) * (w0.dim() - 2))
        expect = lora.magnitude.detach().view((-1,) + (1,) * (w0.dim() - 1)) * v / v.flatten(1).norm(dim=1).view(
            (-1,) + (1,) * (w0.dim() - 1))
        torch.testing.assert_close(_effective(model, target), expect, rtol=1e-6, atol=1e-7)
        # the row norms of the DoRA weight are the magnitude
        torch.testing.assert_close(row_norms(_effective(model, target)), lora.magnitude.detach())
    # a zero row stays zero (no 0/0)
    assert torch.equal(dora_weight(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2)), torch.zeros(2, 3))


def test_dora_gets_gradients_in_magnitude_and_direction():
    from modules.lora import apply_lora

    model = _base().train()
    loras = apply_lora(model, [".attn"], rank=2, lora_type="dora")
    model(*_inputs()).square().mean().backward()
    _, lora = loras[0]
    assert lora.magnitude.grad is not None and lora.magnitude.grad.abs().sum() > 0
    assert lora.lora_down.grad.abs().sum() > 0


def test_named_layout_keys_and_merge_equals_the_unmerged_forward():
    from inference.lora import MergedLora, read_lora
    from modules.lora_formats import (DORA_MAGNITUDE, detect_layout, entries_from_named, merge_entries,
                                      named_state_dict)
    from modules.registry import build_model

    base, model, loras = _trained_dora()
    named = named_state_dict(loras, alpha=2.0)
    assert detect_layout(named) == "named"
    for target, lora in loras:
        assert named[target + DORA_MAGNITUDE].shape == (base[target].shape[0],)
        assert named[target + DORA_MAGNITUDE].dtype == torch.float32
        assert {f"{target}.lora_down", f"{target}.lora_up", f"{target}.alpha"} <= named.keys()
    entries = entries_from_named(named)
    merged = merge_entries(base, entries)
    for target, _ in loras:
        torch.testing.assert_close(merged[target], _effective(model, target), rtol=0, atol=1e-6)
    fresh = build_model("stage_c", "tiny").eval()
    fresh.load_state_dict(merged)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x), model(*x), rtol=1e-5, atol=1e-6)
    # strength as ComfyUI applies it: W + s * (W' - W); 0 is the base bit for bit
    half = merge_entries(base, entries, strength=0.5)
    for target, _ in loras:
        torch.testing.assert_close(half[target], base[target] + 0.5 * (merged[target] - base[target]))
        assert torch.equal(merge_entries(base, entries, strength=0.0)[target], base[target])
    # inference merges through the same rule, and switching strength is exact
    plain = build_model("stage_c", "tiny").eval()
    plain.load_state_dict(base)
    live = MergedLora(plain, read_lora(named, plain))
    live.set_strength(1.0)
    for target, _ in loras:
        assert torch.equal(plain.state_dict()[target], merged[target])
    live.set_strength(0.0)
    for target, _ in loras:
        assert torch.equal(plain.state_dict()[target], base[target])


def _comfy_split(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Stage C parameters under ComfyUI's LoRA names, in_proj split into to_q/to_k/to_v as
    ComfyUI's Stable Cascade model holds them."""
    out = {}
    for name, w in base.items():
        if name.endswith(".in_proj_weight"):
            stem = "lora_prior_unet_" + name[: -len(".in_proj_weight")].replace(".", "_")
            for part, rows in zip(("to_q", "to_k", "to_v"), w.chunk(3)):
                out[f"{stem}_{part}"] = rows
        elif name.endswith(".weight") and w.dim() >= 2:
            out["lora_prior_unet_" + name[: -len(".weight")].replace(".", "_")] = w
    return out


def _comfy_patch(weight: torch.Tensor, lora: dict[str, torch.Tensor], x: str, strength: float) -> torch.Tensor:
    """ComfyUI's LoRA + DoRA weight patch for LoRA name ``x`` (see the module docstring)."""
    weight = weight.float().clone()
    alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
    dora_scale = lora.get(f"{x}.dora_scale")
    mat1, mat2 = lora[f"{x}.lora_up.weight"].float(), lora[f"{x}.lora_down.weight"].float()
    alpha = alpha / mat2.shape[0] if alpha is not None else 1.0
    lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    if dora_scale is None:
        return weight + strength * alpha * lora_diff
    dora_scale = dora_scale.float()
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / norm)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def test_comfyui_export_keys_shapes_and_comfyui_loading_math():
    from modules.lora_formats import (entries_from_named, export_comfyui, merge_entries, named_state_dict,
                                      read_entries)

    base, model, loras = _trained_dora()
    named = named_state_dict(loras, alpha=2.0)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    comfy = export_comfyui(entries_from_named(named), shapes, base_weights=base)
    ours_split = _comfy_split({t: _effective(model, t) for t, _ in loras})
    comfy_base = _comfy_split(base)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    assert stems == set(ours_split)
    assert len(stems) == 2 * len([t for t, _ in loras if t.endswith("in_proj_weight")]) + len(loras)
    for x in stems:
        w = comfy_base[x]
        assert set(k for k in comfy if k.startswith(x + ".")) == {
            f"{x}.lora_down.weight", f"{x}.lora_up.weight", f"{x}.alpha", f"{x}.dora_scale"}
        # ComfyUI's output-axis form: (out, 1) for a linear, (out, 1, 1, 1) for a conv, float32
        assert comfy[f"{x}.dora_scale"].shape == (w.shape[0],) + (1,) * (w.dim() - 1), x
        assert comfy[f"{x}.dora_scale"].dtype == torch.float32
        assert comfy[f"{x}.lora_up.weight"].shape[0] == w.shape[0]
        assert comfy[f"{x}.lora_down.weight"].shape[1:] == w.shape[1:]
        assert comfy[f"{x}.alpha"].dim() == 0
        torch.testing.assert_close(_comfy_patch(w, comfy, x, 1.0), ours_split[x], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_comfy_patch(w, comfy, x, 0.6), w + 0.6 * (ours_split[x] - w),
                                   rtol=1e-5, atol=1e-6)
    # our reader applies a ComfyUI DoRA file with the same math (merge tool / inference)
    entries = read_entries(comfy, list(base), source="comfy")
    merged = merge_entries(base, entries, strength=0.6)
    merged_split = _comfy_split({t: merged[t] for t, _ in loras})
    for x in stems:
        torch.testing.assert_close(merged_split[x], _comfy_patch(comfy_base[x], comfy, x, 0.6), rtol=1e-5, atol=1e-6)


def test_dora_files_refuse_what_they_cannot_hold():
    from modules.lora import apply_lora
    from modules.lora_formats import (LoraFormatError, entries_from_named, export_comfyui, load_into_loras,
                                      named_state_dict, official_state_dict, read_entries)

    base, _model, loras = _trained_dora()
    named = named_state_dict(loras, alpha=2.0)
    with pytest.raises(LoraFormatError, match="no DoRA magnitude"):
        official_state_dict(named, [t for t, _ in loras])
    with pytest.raises(LoraFormatError, match="needs the base weight"):
        export_comfyui(entries_from_named(named), {k: tuple(v.shape) for k, v in base.items()})
    plain = apply_lora(_base(), FILTERS, rank=2, alpha=2.0)
    with pytest.raises(LoraFormatError, match="set lora_type"):
        load_into_loras(plain, entries_from_named(named), 2.0)
    dora = apply_lora(_base(), FILTERS, rank=2, alpha=2.0, lora_type="dora")
    with pytest.raises(LoraFormatError, match="set lora_type"):
        load_into_loras(dora, entries_from_named(named_state_dict(plain, alpha=2.0)), 2.0)
    comfy = export_comfyui(entries_from_named(named), {k: tuple(v.shape) for k, v in base.items()}, base_weights=base)
    with pytest.raises(LoraFormatError, match="ComfyUI DoRA"):
        load_into_loras(dora, read_entries(comfy, list(base)), 2.0)
    load_into_loras(dora, entries_from_named(named), 2.0)  # named DoRA -> DoRA run: exact copy
    for (t, a), (_, b) in zip(loras, dora):
        assert torch.equal(a.magnitude, b.magnitude) and torch.equal(a.lora_up, b.lora_up), t


def test_lora_type_config_checks():
    from core.errors import UserError
    from train.train_c_lora import LoraConfig

    cfg = LoraConfig(lora_type="dora")
    cfg.validate_lora()
    with pytest.raises(UserError, match="lora_type"):
        LoraConfig(lora_type="oft").validate_lora()
    with pytest.raises(UserError, match="save_official_layout"):
        LoraConfig(lora_type="dora", save_official_layout=True).validate_lora()


# ------------------------------------------------------------------------------------------------
CONFIG = str(ROOT / "configs/training/tiny_c_lora.yaml")
RUN = dict(updates=3, save_every=2, lr=1.0e-2, rank=2, lora_type="dora", export_comfyui=True,
           module_filters=[".attn", "depthwise"], train_tokens=[["[tinytok]", "^dog</w>"]])


def test_tiny_dora_run_files_merge_and_exact_resume(adapter_assets, tmp_path):
    from modules.loading import load_model
    from tools.lora_export import main as export_main
    from tools.lora_merge import main as merge_main
    from train.train_c_lora import StageCLoraTrainer

    assets = adapter_assets
    run_a, _run_b = run_and_resume(StageCLoraTrainer, CONFIG, assets, tmp_path, RUN)
    a = load_file(run_a / "lora.safetensors")
    mags = [k for k in a if k.endswith(".dora_magnitude")]
    assert mags and len(mags) == sum(k.endswith(".lora_down") for k in a)
    base = load_file(assets / "stage_c_tiny.safetensors")
    moved = [not torch.allclose(a[k], base[k[: -len(".dora_magnitude")]].flatten(1).norm(dim=1)) for k in mags]
    assert any(moved), "the magnitudes trained"
    with safe_open(str(run_a / "lora.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["lora_type"] == "dora" and json.loads(meta["module_filters"]) == RUN["module_filters"]
    assert not (run_a / "lora_official.safetensors").exists()
    comfy = load_file(run_a / "lora_comfyui.safetensors")
    assert sum(k.endswith(".dora_scale") for k in comfy) == sum(k.endswith(".lora_down.weight") for k in comfy)
    # the export tool (given the base) writes the trainer's ComfyUI file; the merge tool bakes the DoRA in
    out = tmp_path / "comfy.safetensors"
    assert export_main([str(run_a / "lora.safetensors"), "--out", str(out), "--base",
                        str(assets / "stage_c_tiny.safetensors"), "--clip-text-model", str(assets / "clip/text")]) == 0
    exported = load_file(out)
    assert exported.keys() == comfy.keys()
    for k in comfy:
        torch.testing.assert_close(exported[k], comfy[k])
    from tests.test_lora_dora import _comfy_patch, _comfy_split

    for src in ("lora.safetensors", "lora_comfyui.safetensors"):
        merged_path = tmp_path / f"merged_{src}"
        assert merge_main(["--base", str(assets / "stage_c_tiny.safetensors"), "--lora", str(run_a / src),
                           "--out", str(merged_path)]) == 0
        merged = load_model("stage_c", "tiny", merged_path).state_dict()
        split, split_base = _comfy_split(merged), _comfy_split(base)
        for x in {k.rsplit(".", 2)[0] for k in comfy if k.endswith(".lora_down.weight")}:
            torch.testing.assert_close(split[x], _comfy_patch(split_base[x], comfy, x, 1.0), rtol=1e-5, atol=1e-6)
