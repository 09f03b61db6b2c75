"""Adapter file layouts (modules.adapters.layouts): round trips ours -> layout -> ours, files built
the way each tool builds them (key names, shapes, alpha conventions, DoRA normalisation) merging
to weights computed here from the tool's own formula, refusals of what a layout cannot express,
and OneTrainer's depthwise-conv LoRA refused with one line.

The tools' conventions used below (facts from their loaders/savers):
* ComfyUI: ``lora_prior_unet_<module with _>`` or ``diffusion_model.<module>``, attention split into
  ``attn.to_q/to_k/to_v``; scale ``alpha / rank`` (no alpha: 1); a full conv LoRA is
  ``up.flatten(1) @ down.flatten(1)`` reshaped to the weight.
* OneTrainer's original layout: ``unet.<module>`` with the packed projection as ``attn.in_proj.0/1/2``,
  each its own LoRA (its Stable Cascade model has separate q/k/v layers); its diffusers names
  ``lora_prior_unet.<diffusers module>`` (``attention.to_q``, ``attention.to_out.0``); its DoRA
  ``dora_scale`` (1, in) multiplies ``V / ||V||_col`` (norm per input column of the adapted weight);
  on a depthwise conv its LoRA is a full conv ``lora_down`` (r, C, 3, 3) and a 1-output-channel
  ``lora_up`` (1, r, 1, 1) whose output is added to every channel.
* diffusers/PEFT: ``<diffusers module>.lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r), no alpha
  in the file (scale 1).
"""
from __future__ import annotations

import copy

import pytest
import torch

from modules.adapters import AdapterError
from modules.lora import apply_lora, remove_lora
from modules.lora_formats import (LoraFormatError, detect_layout, entries_from_named, export_layout,
                                  load_into_loras, merge_entries, named_state_dict, pack_qkv, read_entries)
from modules.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

ATTN = "down_blocks.0.2.attention.attn"
FILTERS = [".attn", "embedding.1", "channelwise.0"]


def _base():
    torch.manual_seed(0)
    model = build_model("stage_c", "tiny").eval()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _random(model, lora_type="lora", filters=FILTERS, seed=1):
    loras = apply_lora(model, filters, rank=2, alpha=3.0, lora_type=lora_type)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in loras:
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return loras


def _effective(model):
    plain = copy.deepcopy(model)
    remove_lora(plain, leave_parametrized=True)
    return plain.state_dict()


@pytest.mark.parametrize("layout", ["comfyui", "comfyui_model", "kohya", "onetrainer", "diffusers"])
def test_lora_round_trip_through_each_layout(layout):
    model, base = _base()
    loras = _random(model)
    attached = _effective(model)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    sd, dropped = export_layout(entries_from_named(named_state_dict(loras, 3.0)), layout, shapes)
    assert not dropped
    assert detect_layout(sd) == layout
    entries = read_entries(sd, list(base), source=layout)
    merged = merge_entries(base, entries)
    for t, _ in loras:
        torch.testing.assert_close(merged[t], attached[t], rtol=1e-5, atol=1e-6)
    fresh_model, _ = _base()
    fresh = _random(fresh_model, seed=9)
    load_into_loras(fresh, pack_qkv(entries, layout), alpha=3.0, source=layout)
    again = _effective(fresh_model)
    for t, _ in loras:
        torch.testing.assert_close(again[t], attached[t], rtol=1e-5, atol=1e-6)


def _qkv_lora(g, c, rank=2):
    return [(torch.randn(rank, c, generator=g), torch.randn(c, rank, generator=g)) for _ in range(3)]


def _expect_qkv(base, parts, scale):
    w = base[f"{ATTN}.in_proj_weight"].clone()
    c = w.shape[1]
    for i, (down, up) in enumerate(parts):
        w[i * c:(i + 1) * c] += up @ down * scale
    return w


@pytest.mark.parametrize("naming", ["onetrainer", "onetrainer_kohya", "onetrainer_diffusers", "peft",
                                    "comfyui_model"])
def test_files_built_like_each_tool_merge_to_its_formula(naming):
    _model, base = _base()
    c = base[f"{ATTN}.in_proj_weight"].shape[1]
    g = torch.Generator().manual_seed(3)
    parts = _qkv_lora(g, c)
    out_down, out_up = torch.randn(2, c, generator=g), torch.randn(c, 2, generator=g)
    conv = base["embedding.1.weight"]  # 1x1 conv: OneTrainer/ComfyUI write (r, in, 1, 1) / (out, r, 1, 1)
    conv_down, conv_up = torch.randn(2, conv.shape[1], 1, 1, generator=g), torch.randn(conv.shape[0], 2, 1, 1, generator=g)
    alpha = 1.0
    down_k, up_k, with_alpha = "lora_down.weight", "lora_up.weight", True
    if naming == "onetrainer":
        stems = [f"unet.{ATTN}.in_proj.{i}" for i in range(3)] + [f"unet.{ATTN}.out_proj", "unet.embedding.1"]
    elif naming == "onetrainer_kohya":
        flat = "lora_prior_unet_" + ATTN.replace(".", "_")
        stems = [f"{flat}_in_proj_{i}" for i in range(3)] + [f"{flat}_out_proj", "lora_prior_unet_embedding_1"]
    elif naming in ("onetrainer_diffusers", "peft"):
        prefix = "lora_prior_unet." if naming == "onetrainer_diffusers" else ""
        attention = prefix + ATTN[: -len(".attn")]
        stems = [f"{attention}.to_{x}" for x in "qkv"] + [f"{attention}.to_out.0", prefix + "embedding.1"]
        if naming == "peft":
            down_k, up_k, with_alpha = "lora_A.weight", "lora_B.weight", False
    else:
        stems = [f"diffusion_model.{ATTN}.to_{x}" for x in "qkv"] + [f"diffusion_model.{ATTN}.out_proj",
                                                                       "diffusion_model.embedding.1"]
    sd = {}
    for stem, (down, up) in zip(stems, parts + [(out_down, out_up), (conv_down, conv_up)]):
        sd[f"{stem}.{down_k}"], sd[f"{stem}.{up_k}"] = down, up
        if with_alpha:
            sd[f"{stem}.alpha"] = torch.tensor(alpha)
    scale = alpha / 2 if with_alpha else 1.0
    merged = merge_entries(base, read_entries(sd, list(base), source=naming))
    torch.testing.assert_close(merged[f"{ATTN}.in_proj_weight"], _expect_qkv(base, parts, scale))
    torch.testing.assert_close(merged[f"{ATTN}.out_proj.weight"], base[f"{ATTN}.out_proj.weight"] + out_up @ out_down * scale)
    want = base["embedding.1.weight"] + (conv_up.flatten(1) @ conv_down.flatten(1) * scale).view(conv.shape)
    torch.testing.assert_close(merged["embedding.1.weight"], want)
    with pytest.raises(LoraFormatError, match="different lora_down"):
        pack_qkv(read_entries(sd, list(base)))  # separately trained q/k/v: merge yes, one packed LoRA no


def test_onetrainer_dora_uses_its_column_normalisation():
    _model, base = _base()
    target = "embedding.1.weight"
    w = base[target]
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(2, w.shape[1], 1, 1, generator=g), torch.randn(w.shape[0], 2, 1, 1, generator=g)
    v = w + (up.flatten(1) @ down.flatten(1)).view(w.shape) * 0.5
    col = v.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).view(1, -1, 1, 1)
    dora_scale = col * (1 + 0.3 * torch.rand(col.shape, generator=g))
    sd = {"unet.embedding.1.lora_down.weight": down, "unet.embedding.1.lora_up.weight": up,
          "unet.embedding.1.alpha": torch.tensor(1.0), "unet.embedding.1.dora_scale": dora_scale}
    merged = merge_entries(base, read_entries(sd, list(base), source="ot"))[target]
    torch.testing.assert_close(merged, dora_scale * v / col, rtol=1e-5, atol=1e-6)


def test_lycoris_lokr_and_loha_files_in_comfyui_names_merge_to_their_formulas():
    _model, base = _base()
    w = base[f"{ATTN}.out_proj.weight"]
    out, inp = w.shape
    g = torch.Generator().manual_seed(5)
    w1, w2a, w2b = torch.randn(4, 4, generator=g), torch.randn(out // 4, 2, generator=g), torch.randn(2, inp // 4, generator=g)
    stem = "lora_prior_unet_" + ATTN.replace(".", "_") + "_out_proj"
    sd = {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b, f"{stem}.alpha": torch.tensor(4.0)}
    e = read_entries(sd, list(base))
    assert [x.kind for x in e] == ["lokr"]
    merged = merge_entries(base, e)[f"{ATTN}.out_proj.weight"]
    torch.testing.assert_close(merged, w + torch.kron(w1, w2a @ w2b) * 2.0)
    h = {n: torch.randn(*s, generator=g) for n, s in
         (("hada_w1_a", (out, 2)), ("hada_w1_b", (2, inp)), ("hada_w2_a", (out, 2)), ("hada_w2_b", (2, inp)))}
    sd = {f"{stem}.{n}": t for n, t in h.items()} | {f"{stem}.alpha": torch.tensor(1.0)}
    merged = merge_entries(base, read_entries(sd, list(base)))[f"{ATTN}.out_proj.weight"]
    want = w + (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"]) * 0.5
    torch.testing.assert_close(merged, want)


def _onetrainer_depthwise(base):
    w = base["down_blocks.0.0.depthwise.weight"]  # (C, 1, 3, 3)
    g = torch.Generator().manual_seed(6)
    return {"unet.down_blocks.0.0.depthwise.lora_down.weight": torch.randn(2, w.shape[0], 3, 3, generator=g),
            "unet.down_blocks.0.0.depthwise.lora_up.weight": torch.randn(1, 2, 1, 1, generator=g),
            "unet.down_blocks.0.0.depthwise.alpha": torch.tensor(2.0)}


def test_onetrainer_depthwise_lora_is_refused_with_one_line_and_nothing_changes(tmp_path):
    from safetensors.torch import save_file

    from inference.errors import UserError
    from inference.lora import apply_lora_file
    from tools.lora_merge import merge_files

    model, base = _base()
    sd = _onetrainer_depthwise(base)
    with pytest.raises(LoraFormatError, match="unet.down_blocks.0.0.depthwise.*extra branch") as exc:
        merge_entries(base, read_entries(sd, list(base)))
    assert "\n" not in str(exc.value)
    path = tmp_path / "ot.safetensors"
    save_file(sd, str(path))
    with pytest.raises(UserError, match="depthwise.*1-output-channel"):
        apply_lora_file(model, str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    base_path = tmp_path / "base.safetensors"
    save_file(base, str(base_path))
    with pytest.raises(LoraFormatError, match="not a change of the depthwise weight"):
        merge_files(str(base_path), str(path), str(tmp_path / "out.safetensors"), model_version="tiny")
    assert not (tmp_path / "out.safetensors").exists()


def test_exports_refuse_what_a_layout_cannot_express_unless_dropped():
    model, base = _base()
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    dora = entries_from_named(named_state_dict(_random(model, "dora", [".attn"]), 3.0))
    with pytest.raises(LoraFormatError, match="is a dora; the kohya layout holds lora only: kohya sd-scripts"):
        export_layout(dora, "kohya", shapes, base_weights=base)
    sd, dropped = export_layout(dora, "kohya", shapes, base_weights=base, drop=True)
    assert not sd and len(dropped) == len(dora) and dropped[0].startswith(dora[0].target + ": ")
    with pytest.raises(LoraFormatError, match="INPUT column"):
        export_layout(dora, "onetrainer", shapes, base_weights=base)
    model, _ = _base()
    depthwise = entries_from_named(named_state_dict(_random(model, "lora", ["depthwise"]), 3.0))
    with pytest.raises(LoraFormatError, match="depthwise conv.*OneTrainer"):
        export_layout(depthwise, "onetrainer", shapes)
    model, _ = _base()
    lokr = entries_from_named(named_state_dict(_random(model, "lokr", [".attn"]), 3.0))
    with pytest.raises(LoraFormatError, match="lokr; the diffusers layout.*PEFT"):
        export_layout(lokr, "diffusers", shapes)
    with pytest.raises(AdapterError):  # the kind itself knows it cannot split rows of its own DoRA magnitude
        dora[0].adapter.split_rows(dora[0].tensors, 3, "x")


def test_export_tool_drop_lists_what_it_left_out(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from tools.lora_export import main as export_main

    model, base = _base()
    loras = _random(model, "lora", [".attn", "depthwise"])
    src, out = tmp_path / "lora.safetensors", tmp_path / "ot.safetensors"
    save_file(named_state_dict(loras, 3.0), str(src), metadata={"model_version": "tiny",
                                                                "module_filters": '[".attn", "depthwise"]'})
    from core.errors import UserError

    with pytest.raises((UserError, LoraFormatError), match="depthwise"):
        export_main([str(src), "--out", str(out), "--format", "onetrainer"])
    assert export_main([str(src), "--out", str(out), "--format", "onetrainer", "--drop"]) == 0
    err = capsys.readouterr().err
    assert "dropped: down_blocks.0.0.depthwise.weight" in err
    written = load_file(str(out))
    assert written and not any("depthwise" in k for k in written)
    assert any(k.startswith(f"unet.{ATTN}.in_proj.0.") for k in written)
