"""LoRA / ReToken parametrizations on tiny models."""
import copy

import pytest
import torch
from torch import nn

from modules.lora import (
    LoRA, ReToken, apply_lora, apply_retoken, load_lora_state_dict_official, lora_module_dict, lora_state_dict_named,
    lora_state_dict_official, lora_targets, remove_lora)
from modules.registry import build_model


# tiny tensors: one intra-op thread is faster and avoids OpenMP oversubscription on shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_c(seed=0):
    model = build_model("stage_c", "tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(5)
    return dict(x=torch.randn(2, 16, 8, 8, generator=g), r=torch.rand(2, generator=g),
                clip_text=torch.randn(2, 77, 32, generator=g), clip_text_pooled=torch.randn(2, 1, 32, generator=g),
                clip_img=torch.randn(2, 1, 24, generator=g))


def test_zero_init_lora_is_identity_and_merge_matches():
    model = _tiny_c()
    with torch.no_grad():
        ref = model(**_inputs())
    loras = apply_lora(model, filters=[".attn"], rank=4)
    # tiny: 3 attentions down + 3 up, each with out_proj then in_proj
    assert len(loras) == 12
    assert loras[0][0] == "down_blocks.0.2.attention.attn.out_proj.weight"
    assert loras[1][0] == "down_blocks.0.2.attention.attn.in_proj_weight"
    assert all(l.scale == 0.25 for _, l in loras)
    with torch.no_grad():
        assert torch.allclose(model(**_inputs()), ref, atol=1e-6)
        for _, l in loras:
            l.lora_down.normal_()
        unmerged = model(**_inputs())
    assert not torch.allclose(unmerged, ref)
    only_lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(only_lora) == 24
    for _, l in loras:
        l.enabled = False
    with torch.no_grad():
        assert torch.allclose(model(**_inputs()), ref, atol=1e-6)
    for _, l in loras:
        l.enabled = True
    remove_lora(model, leave_parametrized=True)
    assert "parametrizations" not in " ".join(model.state_dict())
    assert list(model.state_dict()) == list(build_model("stage_c", "tiny", device="meta").state_dict())
    with torch.no_grad():
        assert torch.allclose(model(**_inputs()), unmerged, atol=1e-5)


def test_lora_training_step_changes_only_lora():
    model = _tiny_c()
    loras = apply_lora(model, filters=[".attn"], rank=2)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model.train()(**_inputs()).square().mean().backward()
    assert all(l.lora_up.grad is not None for _, l in loras)


def test_filters_none_skips_one_dim_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    loras = apply_lora(model, rank=2)
    assert [n for n, _ in loras] == ["0.weight", "2.weight"]


def test_lora_on_conv_and_alpha():
    conv = nn.Conv2d(3, 5, 3)
    lora = LoRA(conv, rank=2, alpha=4.0)
    assert lora.scale == 2.0 and lora.lora_down.shape == (2, 3) and lora.lora_up.shape == (5, 2)
    with torch.no_grad():
        lora.lora_down.normal_()
    w = conv.weight.detach()
    expect = w + (lora.lora_up @ lora.lora_down)[:, :, None, None] * 2.0
    assert torch.allclose(lora(w), expect)


def test_filters_matching_nothing():
    model = build_model("stage_c", "tiny", device="meta")
    with pytest.raises(ValueError, match="down_blocks"):
        apply_lora(model, filters=["no_such_layer"])


def test_lora_targets_is_apply_lora_order_without_touching_the_model():
    model = build_model("stage_c", "tiny", device="meta")
    keys = list(model.state_dict())
    for filters in ([".attn"], [".attn", "mapper"], None):
        targets = lora_targets(model, filters)
        assert list(model.state_dict()) == keys  # nothing was registered
        assert [n for n, _ in apply_lora(copy.deepcopy(model), filters, rank=1)] == targets
    with pytest.raises(ValueError, match="down_blocks"):
        lora_targets(model, ["no_such_layer"])


def test_official_and_named_state_dicts_round_trip():
    model = build_model("stage_c", "tiny")
    loras = apply_lora(model, filters=[".attn"], rank=4)
    emb = nn.Embedding(10, 32)
    retoken = apply_retoken(emb, [7])
    assert retoken.embeddings.shape == (1, 32)
    sd = lora_state_dict_official(loras, retoken)
    container = lora_module_dict(loras, retoken)
    assert list(container.state_dict()) == list(sd)
    assert sum(p.numel() for p in container.parameters()) == sum(v.numel() for k, v in sd.items() if k != "embeddings.indices")
    assert list(sd)[:4] == ["embeddings.embeddings", "embeddings.indices", "weights.0.lora_down", "weights.0.lora_up"]
    assert sd["embeddings.indices"].dtype == torch.int64
    named = lora_state_dict_named(loras)
    assert "down_blocks.0.2.attention.attn.in_proj_weight.lora_down" in named
    other = build_model("stage_c", "tiny")
    other_loras = apply_lora(other, filters=[".attn"], rank=4)
    other_retoken = ReToken([7], width=32)
    new = {k: torch.randn_like(v.float()) if v.is_floating_point() else v for k, v in sd.items()}
    load_lora_state_dict_official(other_loras, new, other_retoken)
    assert torch.equal(other_loras[3][1].lora_up, new["weights.3.lora_up"])
    with pytest.raises(ValueError, match="weights.0.lora_down"):
        load_lora_state_dict_official(other_loras, {k: v for k, v in new.items() if k != "weights.0.lora_down"},
                                      other_retoken)


def test_retoken():
    emb = nn.Embedding(6, 4)
    base = emb.weight.detach().clone()
    retoken = apply_retoken(emb, [1, 4])
    assert torch.equal(emb.weight, base)
    with torch.no_grad():
        retoken.embeddings.fill_(1.0)
    out = emb(torch.tensor([0, 1, 4]))
    assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1] + 1) and torch.equal(out[2], base[4] + 1)
    assert ReToken([3]).embeddings.shape == (1, 1280)
    remove_lora(emb)
    assert torch.equal(emb.weight[4], base[4] + 1)
