"""Adapter kinds (modules.adapters): each kind's update against a formula written out here, the
registry, parameter counts, ComfyUI key names, train -> export -> re-import, LoRA+, and a tiny
LoKr run that resumes exactly (the LoRA and DoRA runs: tests/test_lora_train.py, test_lora_dora.py).

The formulas (LyCORIS / ComfyUI ``comfy/weight_adapter``): LoKr ``kron(w1, w2) * alpha / r`` with
r the rank of the low-rank factor (w2's), scale 1 when both factors are full; LoHa
``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``, r = rows of ``hada_w1_b``; Tucker cores rebuild a
conv factor as ``sum_ij t[i, j] * a[:, i] (x) b[j, :]``.
"""
from __future__ import annotations

import copy

import pytest
import torch

from modules.adapters import AdapterError, kind, kinds
from modules.lora import adapter_param_count, apply_lora, remove_lora
from modules.lora_formats import (LoraFormatError, entries_from_named, export_layout, load_into_loras,
                                  merge_entries, named_state_dict, official_state_dict, pack_qkv,
                                  read_entries)
from modules.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

FILTERS = [".attn", "depthwise", "embedding.1"]  # packed in_proj, out_proj, 3x3 depthwise and 1x1 convs
KINDS = ("lora", "dora", "lokr", "loha")
WRITES = ("official", "comfyui", "comfyui_model", "kohya", "onetrainer", "diffusers")
#: kind -> layout -> whether an export can express it (the table of docs/LORA.md)
WRITES_EXPECTED = {
    "lora": dict.fromkeys(WRITES, True),
    "dora": {"official": False, "comfyui": True, "comfyui_model": True, "kohya": False, "onetrainer": False,
             "diffusers": False},
    "lokr": {"official": False, "comfyui": True, "comfyui_model": True, "kohya": False, "onetrainer": False,
             "diffusers": False},
    "loha": {"official": False, "comfyui": True, "comfyui_model": True, "kohya": False, "onetrainer": True,
             "diffusers": False},
}


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product of two matrices, written out (independent of torch.kron)."""
    out = torch.zeros(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * b.shape[0]:(i + 1) * b.shape[0], j * b.shape[1]:(j + 1) * b.shape[1]] = a[i, j] * b
    return out


def test_registry_names_the_four_kinds_and_refuses_others():
    assert set(KINDS) <= set(kinds())
    with pytest.raises(AdapterError, match="unknown adapter kind 'oft'"):
        kind("oft")


def test_lokr_and_loha_deltas_equal_the_written_out_formulas():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # LoKr, linear (12, 8): w1 full (3, 2), w2 = w2_a (4, 2) @ w2_b (2, 4), alpha 3 -> scale 3 / 2
    t = {"lokr_w1": r(3, 2), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 4)}
    want = _kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 1.5
    torch.testing.assert_close(kind("lokr").record_delta(t, 3.0, (12, 8)), want)
    # both factors full: alpha ignored (scale 1)
    full = {"lokr_w1": r(3, 2), "lokr_w2": r(4, 4)}
    torch.testing.assert_close(kind("lokr").record_delta(full, 7.0, (12, 8)), _kron(full["lokr_w1"], full["lokr_w2"]))
    # conv (6, 4, 3, 3) with a 4-D w2 (3, 2, 3, 3): kron over (out, in), kernel from w2
    conv = {"lokr_w1": r(2, 2), "lokr_w2": r(3, 2, 3, 3)}
    want = torch.zeros(6, 4, 3, 3)
    for i in range(2):
        for j in range(2):
            want[3 * i:3 * i + 3, 2 * j:2 * j + 2] = conv["lokr_w1"][i, j] * conv["lokr_w2"]
    torch.testing.assert_close(kind("lokr").record_delta(conv, None, (6, 4, 3, 3)), want)
    # Tucker w2 (LyCORIS' layout: w2_a (r, out), w2_b (r, in), core (r, r, 3, 3))
    tk = {"lokr_w1": r(2, 2), "lokr_w2_a": r(2, 3), "lokr_w2_b": r(2, 2), "lokr_t2": r(2, 2, 3, 3)}
    w2 = torch.zeros(3, 2, 3, 3)
    for i in range(2):
        for j in range(2):
            w2 += tk["lokr_t2"][i, j][None, None] * torch.outer(tk["lokr_w2_a"][i], tk["lokr_w2_b"][j])[..., None, None]
    want = torch.zeros(6, 4, 3, 3)
    for i in range(2):
        for j in range(2):
            want[3 * i:3 * i + 3, 2 * j:2 * j + 2] = tk["lokr_w1"][i, j] * w2
    torch.testing.assert_close(kind("lokr").record_delta(tk, 4.0, (6, 4, 3, 3)), want * 2.0)
    # LoHa (12, 8) rank 2, alpha 1 -> scale 1/2; conv (6, 4, 3, 3) flattens the kernel into the columns
    h = {"hada_w1_a": r(12, 2), "hada_w1_b": r(2, 8), "hada_w2_a": r(12, 2), "hada_w2_b": r(2, 8)}
    want = (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"]) * 0.5
    torch.testing.assert_close(kind("loha").record_delta(h, 1.0, (12, 8)), want)
    hc = {"hada_w1_a": r(6, 2), "hada_w1_b": r(2, 36), "hada_w2_a": r(6, 2), "hada_w2_b": r(2, 36)}
    want = ((hc["hada_w1_a"] @ hc["hada_w1_b"]) * (hc["hada_w2_a"] @ hc["hada_w2_b"])).view(6, 4, 3, 3)
    torch.testing.assert_close(kind("loha").record_delta(hc, 2.0, (6, 4, 3, 3)), want)


def _trained(lora_type: str, seed: int = 0, **options):
    """``(base state dict, model with adapters, adapters)`` after 3 Adam updates of a toy loss."""
    torch.manual_seed(seed)
    model = build_model("stage_c", "tiny").eval()
    torch.nn.init.xavier_uniform_(model.clf[1].weight)  # a fresh Stage C's output conv is zero
    base = {k: v.clone() for k, v in model.state_dict().items()}
    loras = apply_lora(model, FILTERS, rank=2, alpha=2.0, lora_type=lora_type, **options)
    params = [p for _, a in loras for p in a.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(2, 16, 2, 2, generator=g), torch.rand(2, generator=g), torch.randn(2, 77, 32, generator=g),
         torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 24, generator=g))
    for _ in range(3):
        opt.zero_grad()
        model(*x).pow(2).mean().backward()
        opt.step()
    return base, model, loras


def _effective(model) -> dict:
    plain = copy.deepcopy(model)
    remove_lora(plain, leave_parametrized=True)
    return plain.state_dict()


@pytest.mark.parametrize("lora_type", KINDS)
def test_train_three_updates_export_reimport_equal_merged_weights(lora_type, tmp_path):
    from safetensors.torch import load_file, save_file

    base, model, loras = _trained(lora_type)
    attached = _effective(model)
    moved = [t for t, _ in loras if not torch.equal(attached[t], base[t])]
    assert len(moved) == len(loras), "every adapter trained"
    path = tmp_path / "lora.safetensors"
    save_file(named_state_dict(loras, alpha=2.0), str(path))
    entries = read_entries(load_file(str(path)), list(base), source=str(path))
    assert {e.kind for e in entries} == {lora_type}
    merged = merge_entries(base, entries)
    for t, _ in loras:
        torch.testing.assert_close(merged[t], attached[t], rtol=1e-5, atol=1e-6)
    # every other layout: written and read back to the same weights, or refused (docs/LORA.md's table)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    written = {}
    for layout in WRITES:
        usable = [e for e in entries if "depthwise" not in e.target or layout not in ("onetrainer", "diffusers")]
        order = [t for t, _ in loras]
        try:
            if layout == "official":  # positional: in the official target order
                sd, dropped = official_state_dict(named_state_dict(loras, 2.0), order), []
            else:
                sd, dropped = export_layout(usable, layout, shapes, base_weights=base)
        except LoraFormatError:
            written[layout] = False
            continue
        assert not dropped
        written[layout] = True
        again = merge_entries(base, read_entries(sd, list(base), official_targets=order, source=layout))
        for e in usable:
            torch.testing.assert_close(again[e.target], attached[e.target], rtol=1e-5, atol=1e-5)
    assert written == WRITES_EXPECTED[lora_type]
    # kohya-prefixed files of every kind (LyCORIS writes them so) are read too
    comfy, _ = export_layout(entries, "comfyui", shapes, base_weights=base)
    kohya = {"lora_unet_" + k[len("lora_prior_unet_"):]: v for k, v in comfy.items()}
    again = merge_entries(base, read_entries(kohya, list(base), source="kohya"))
    for t, _ in loras:
        torch.testing.assert_close(again[t], attached[t], rtol=1e-5, atol=1e-5)
    # re-import into fresh adapters of the same kind: the same tensors, the same model
    _, fresh_model, fresh = _trained(lora_type, seed=5)
    load_into_loras(fresh, read_entries(load_file(str(path)), list(base)), alpha=2.0)
    for (t, a), (_, b) in zip(loras, fresh):
        for name, tensor in a.tensors().items():
            assert torch.equal(tensor, b.tensors()[name]), (t, name)


def test_comfyui_key_names_of_each_kind():
    names = {}
    for lora_type in KINDS:
        base, _model, loras = _trained(lora_type)
        shapes = {k: tuple(v.shape) for k, v in base.items()}
        comfy, _ = export_layout(entries_from_named(named_state_dict(loras, 2.0)), "comfyui", shapes, base_weights=base)
        stem = "lora_prior_unet_down_blocks_0_2_attention_attn_to_k"
        names[lora_type] = sorted(k[len(stem) + 1:] for k in comfy if k.startswith(stem + "."))
        assert any(k.startswith("lora_prior_unet_down_blocks_0_0_depthwise.") for k in comfy)
    assert names["lora"] == ["alpha", "lora_down.weight", "lora_up.weight"]
    assert names["dora"] == ["alpha", "dora_scale", "lora_down.weight", "lora_up.weight"]
    assert names["loha"] == ["alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    assert names["lokr"][0] == "alpha" and "lokr_w1" in names["lokr"]
    assert set(names["lokr"]) - {"alpha", "lokr_w1"} in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})


@pytest.mark.parametrize("lora_type", KINDS)
def test_fresh_adapter_is_identity_and_counts_match_the_interface(lora_type):
    torch.manual_seed(0)
    model = build_model("stage_c", "tiny").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in before.items()}
    options = {"factor": 4} if "factor" in kind(lora_type).config_options else {}  # LoKr's option
    loras = apply_lora(model, FILTERS, rank=2, lora_type=lora_type, **options)
    built = sum(p.numel() for _, a in loras for p in a.parameters())
    assert built == adapter_param_count(shapes, [t for t, _ in loras], lora_type, 2, **options)
    after = _effective(model)
    for t, _ in loras:
        assert torch.equal(after[t], before[t]), t


def test_packed_qkv_lokr_splits_into_three_and_joins_back():
    base, _model, loras = _trained("lokr")
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    entries = entries_from_named(named_state_dict(loras, 2.0))
    comfy, _ = export_layout(entries, "comfyui", shapes)
    back = pack_qkv(read_entries(comfy, list(base)))
    by = {e.target: e for e in back}
    for e in entries:
        for name, t in e.tensors.items():
            assert torch.equal(by[e.target].tensors[name], t), (e.target, name)


def test_lora_plus_puts_the_up_factors_in_a_faster_group():
    from types import SimpleNamespace

    from train.train_c_lora import StageCLoraTrainer

    for lora_type, ups in (("lora", {"lora_up"}), ("loha", {"hada_w1_a", "hada_w2_a"})):
        _base, _model, loras = _trained(lora_type)
        job = SimpleNamespace(cfg=SimpleNamespace(lora_plus_ratio=16.0, lr=1e-4), loras=loras)
        params = [p for _, a in loras for p in a.parameters()]
        groups = StageCLoraTrainer.optimizer_param_groups(job, params)
        assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1.6e-3)
        fast = {id(p) for p in groups[1]["params"]}
        for _, a in loras:
            assert {n for n, p in a.tensors().items() if id(p) in fast} == ups
        job.cfg.lora_plus_ratio = 1.0
        assert StageCLoraTrainer.optimizer_param_groups(job, params) is params


def test_config_accepts_every_kind_and_checks_the_new_keys():
    from core.errors import UserError
    from train.train_c_lora import LoraConfig

    for lora_type in KINDS:
        LoraConfig(lora_type=lora_type).validate_lora()
    with pytest.raises(UserError, match="save_official_layout"):
        LoraConfig(lora_type="lokr", save_official_layout=True).validate_lora()
    with pytest.raises(UserError, match="lora_plus_ratio"):
        LoraConfig(lora_plus_ratio=0.0).validate_lora()
    with pytest.raises(UserError, match="lokr_factor"):
        LoraConfig(lora_type="lokr", lokr_factor=0).validate_lora()


# ------------------------------------------------------------------------------------------------
def _run_kind(lora_type: str, assets, tmp_path, **extra):
    from safetensors.torch import load_file

    from tests.helpers.adapter_assets import run_and_resume
    from tests.test_lora_dora import CONFIG
    from tools.lora_merge import main as merge_main
    from train.train_c_lora import StageCLoraTrainer

    run = dict(updates=3, save_every=2, lr=1.0e-2, rank=2, lora_type=lora_type, export_comfyui=True,
               module_filters=[".attn", "depthwise"], lora_plus_ratio=4.0, **extra)
    run_a, _run_b = run_and_resume(StageCLoraTrainer, CONFIG, assets, tmp_path, run)
    assert not (run_a / "lora_official.safetensors").exists()
    base_path = assets / "stage_c_tiny.safetensors"
    base = load_file(base_path)
    outs = []
    for src in ("lora.safetensors", "lora_comfyui.safetensors"):
        out = tmp_path / f"merged_{src}"
        assert merge_main(["--base", str(base_path), "--lora", str(run_a / src), "--out", str(out)]) == 0
        outs.append(load_file(out))
    changed = [k for k in base if not torch.equal(outs[0][k], base[k])]
    assert changed
    for k in base:
        torch.testing.assert_close(outs[1][k], outs[0][k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tiny_lokr_run_resumes_exactly_with_lora_plus(adapter_assets, tmp_path):
    _run_kind("lokr", adapter_assets, tmp_path, lokr_factor=4)


@pytest.mark.slow
def test_tiny_loha_run_resumes_exactly_with_lora_plus(adapter_assets, tmp_path):
    _run_kind("loha", adapter_assets, tmp_path)


@pytest.mark.parametrize("lora_type", KINDS)
def test_every_kind_wraps_a_quantised_base(lora_type):
    """Adapters attach after ``quantize_frozen_`` and receive the dequantised weight: a fresh one
    leaves the quantised model's output unchanged and every adapter tensor gets a gradient."""
    from modules.quantize import quantize_frozen_

    torch.manual_seed(0)
    model = build_model("stage_c", "tiny").eval().requires_grad_(False)
    torch.nn.init.xavier_uniform_(model.clf[1].weight)
    assert quantize_frozen_(model, "int8", min_numel=0) > 0
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 16, 2, 2, generator=g), torch.rand(2, generator=g), torch.randn(2, 77, 32, generator=g),
         torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 24, generator=g))
    with torch.no_grad():
        before = model(*x)
    loras = apply_lora(model, [".attn", "channelwise"], rank=2, lora_type=lora_type)
    out = model(*x)
    torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-6)
    out.pow(2).mean().backward()
    assert all(p.grad is not None for _, a in loras for p in a.parameters())
