"""StageB / StageC numerics at tiny sizes: forward/backward, init, attention, ControlNet, checkpointing."""
import math

import pytest
import torch
from torch import nn

from modules.common import (
    Attention2D, GlobalResponseNorm, ResBlock, TimestepBlock, gen_r_embedding)
from modules.lora import apply_lora
from modules.registry import build_model


# tiny tensors: one intra-op thread is faster and avoids OpenMP oversubscription on shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _c_inputs(dtype=torch.float32, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, 16, 8, 8, generator=g).to(dtype), r=torch.rand(b, generator=g),
                clip_text=torch.randn(b, 77, 32, generator=g), clip_text_pooled=torch.randn(b, 1, 32, generator=g),
                clip_img=torch.randn(b, 1, 24, generator=g))


def _b_inputs(dtype=torch.float32, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, 4, 16, 16, generator=g).to(dtype), r=torch.rand(b, generator=g),
                effnet=torch.randn(b, 16, 3, 3, generator=g), clip=torch.randn(b, 1, 32, generator=g))


@pytest.fixture(scope="module")
def stage_c():
    return _randomise(build_model("stage_c", "tiny")).eval()


@pytest.fixture(scope="module")
def stage_b():
    return _randomise(build_model("stage_b", "tiny")).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["stage_c", "stage_b"])
def test_forward_backward(kind, dtype):
    model = _randomise(build_model(kind, "tiny")).to(dtype).train()
    inputs = (_c_inputs if kind == "stage_c" else _b_inputs)(dtype)
    inputs["x"].requires_grad_(True)
    out = model(**inputs)
    assert out.shape == inputs["x"].shape and out.dtype == dtype
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert inputs["x"].grad is not None
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["stage_c", "stage_b"])
def test_autocast_bf16_matches_float32_roughly(kind, stage_c, stage_b):
    model = stage_c if kind == "stage_c" else stage_b
    inputs = (_c_inputs if kind == "stage_c" else _b_inputs)()
    with torch.no_grad():
        ref = model(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs)
    assert (out.float() - ref).abs().mean() < 0.1 * ref.abs().mean() + 1e-3


def test_init_rules():
    for kind in ("stage_c", "stage_b"):
        model = build_model(kind, "tiny")
        assert torch.count_nonzero(model.clf[1].weight) == 0
        for m in model.modules():
            if isinstance(m, TimestepBlock):
                assert all(torch.count_nonzero(l.weight) == 0 for l in m.modules() if isinstance(l, nn.Linear))
            if isinstance(m, GlobalResponseNorm):
                assert torch.count_nonzero(m.gamma) == 0 and torch.count_nonzero(m.beta) == 0
            if isinstance(m, nn.MultiheadAttention):
                assert torch.count_nonzero(m.in_proj_bias) == 0 and torch.count_nonzero(m.out_proj.bias) == 0
        # embedding conv: xavier with gain 0.02
        w = model.embedding[1].weight
        bound = 0.02 * math.sqrt(6 / (w.shape[0] + w.shape[1]))
        assert w.abs().max() <= bound


def test_residual_scaling():
    torch.manual_seed(0)
    model = build_model("stage_c", "tiny", blocks=[[50, 2], [2, 1]])
    # xavier bound of Linear(4c, c) scaled by sqrt(1/52)
    w = model.down_blocks[0][0].channelwise[4].weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1])) * math.sqrt(1 / 52)
    assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.5 * bound


def test_r_embedding():
    emb = gen_r_embedding(torch.zeros(3), 64)
    assert torch.equal(emb, torch.cat([torch.zeros(3, 32), torch.ones(3, 32)], 1))
    r = torch.tensor([0.3])
    emb = gen_r_embedding(r, 64)
    k = math.log(10000) / 31
    assert torch.allclose(emb[0, 5], torch.sin(torch.tensor(3000.0 * math.exp(-k * 5))), atol=1e-4)
    assert torch.allclose(emb[0, 32 + 5], torch.cos(torch.tensor(3000.0 * math.exp(-k * 5))), atol=1e-4)
    assert gen_r_embedding(r, 7).shape == (1, 7) and gen_r_embedding(r, 7)[0, -1] == 0


def test_grn_formula():
    grn = GlobalResponseNorm(6)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 3, 4, 6)
    g = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    n = g / (g.mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(grn(x), grn.gamma * (x * n) + grn.beta + x, atol=1e-6)


def test_resblock_skip_after_norm():
    blk = _randomise(ResBlock(8, c_skip=4))
    x, skip = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 5, 5)
    h = blk.norm(blk.depthwise(x))
    h = torch.cat([h, skip], 1).permute(0, 2, 3, 1)
    ref = blk.channelwise(h).permute(0, 3, 1, 2) + x
    assert torch.allclose(blk(x, skip), ref, atol=1e-6)


@pytest.mark.parametrize("self_attn", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_sdpa_matches_multihead_attention(self_attn, lora):
    torch.manual_seed(0)
    att = Attention2D(16, 4).eval()
    _randomise(att)
    if lora:
        loras = apply_lora(att, filters=["attn"], rank=2)
        with torch.no_grad():
            for _, l in loras:
                l.lora_down.normal_()
    x, kv = torch.randn(2, 16, 3, 5), torch.randn(2, 7, 16)
    q = x.flatten(2).permute(0, 2, 1)
    kv_full = torch.cat([q, kv], 1) if self_attn else kv
    ref = att.attn(q, kv_full, kv_full, need_weights=False)[0].permute(0, 2, 1).reshape(x.shape)
    assert torch.allclose(att(x, kv, self_attn=self_attn), ref, atol=1e-5)


def test_dropout_only_in_train_mode(stage_c):
    inputs = _c_inputs()
    with torch.no_grad():
        a, b = stage_c(**inputs), stage_c(**inputs)
        assert torch.equal(a, b)
        stage_c.train()
        try:
            c = stage_c(**inputs)
        finally:
            stage_c.eval()
    assert not torch.allclose(a, c)
    att = _randomise(Attention2D(16, 4, dropout=0.5))
    x, kv = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 16)
    att.eval()
    assert torch.equal(att(x, kv), att(x, kv))
    att.train()
    assert not torch.allclose(att(x, kv), att(x, kv))


def test_two_dim_pooled_and_img_accepted(stage_c):
    inputs = _c_inputs()
    with torch.no_grad():
        ref = stage_c(**inputs)
        inputs["clip_text_pooled"] = inputs["clip_text_pooled"][:, 0]
        inputs["clip_img"] = inputs["clip_img"][:, 0]
        assert torch.equal(stage_c(**inputs), ref)


def test_stage_c_t_conds_default_to_zero(stage_c):
    inputs = _c_inputs()
    with torch.no_grad():
        ref = stage_c(**inputs)
        z = torch.zeros(2)
        assert torch.equal(stage_c(**inputs, sca=z, crp=z), ref)
        assert not torch.allclose(stage_c(**inputs, sca=z + 0.5), ref)


def test_stage_b_pixels_default_and_clip_2d(stage_b):
    inputs = _b_inputs()
    with torch.no_grad():
        ref = stage_b(**inputs)
        assert torch.equal(stage_b(**inputs, pixels=torch.zeros(2, 3, 8, 8)), ref)
        inputs["clip"] = inputs["clip"][:, 0]
        assert torch.equal(stage_b(**inputs), ref)


def _resblock_inputs(model, **inputs):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
             for m in model.modules() if isinstance(m, ResBlock)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_controlnet_injection_indices(stage_c):
    inputs = _c_inputs()
    base = _resblock_inputs(stage_c, **inputs)
    assert len(base) == 6  # tiny: 1 + 2 down, 2 + 1 up ResBlock calls
    for k in range(len(base)):
        entry = torch.full((2, 32, 2, 2), 0.25)  # constant, so the bilinear-AC resize is exact
        got = _resblock_inputs(stage_c, **inputs, cnet=[None] * k + [entry])
        for i in range(k):
            assert torch.equal(got[i], base[i])
        assert torch.allclose(got[k], base[k] + 0.25, atol=1e-6)
    # entries past the number of ResBlock calls are ignored
    extra = _resblock_inputs(stage_c, **inputs, cnet=[None] * 6 + [torch.ones(2, 32, 2, 2)])
    assert all(torch.equal(a, b) for a, b in zip(extra, base))


@pytest.mark.parametrize("kind", ["stage_c", "stage_b"])
def test_gradient_checkpointing_same_gradients(kind):
    inputs = (_c_inputs if kind == "stage_c" else _b_inputs)()
    grads = []
    for enabled in (False, True):
        model = _randomise(build_model(kind, "tiny", gradient_checkpointing=enabled)).train()
        assert model.gradient_checkpointing is enabled
        torch.manual_seed(123)  # dropout masks must be replayed identically
        model(**inputs).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
    model.set_gradient_checkpointing(False)
    assert not model.gradient_checkpointing


def test_unknown_version_lists_known():
    with pytest.raises(ValueError, match="3.6B"):
        build_model("stage_c", "2B", device="meta")


@pytest.mark.parametrize("autocast", [False, True])
def test_stage_c_switch_level_resamples(autocast):
    model = _randomise(build_model("stage_c", "tiny", switch_level=[True])).eval()
    assert isinstance(model.down_downscalers[1][1].blocks[1], nn.Upsample)
    assert isinstance(model.up_upscalers[0][1].blocks[0], nn.Upsample)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**_c_inputs())
    assert out.shape == (2, 16, 8, 8)
    bf16 = model.to(torch.bfloat16)
    with torch.no_grad():
        assert bf16(**_c_inputs(torch.bfloat16)).dtype == torch.bfloat16


def test_stage_b_odd_level_sizes_resize_to_skip(stage_b):
    # 20x20 latent -> 10, 5, 2, 1: the up path must resize 4 -> 5 before the skip concat.
    inputs = _b_inputs()
    inputs["x"] = torch.randn(2, 4, 20, 20)
    with torch.no_grad():
        assert stage_b(**inputs).shape == (2, 4, 20, 20)
        assert stage_b.to(torch.bfloat16)(**dict(inputs, x=inputs["x"].bfloat16())).dtype == torch.bfloat16
    stage_b.float()


def test_update_weights_ema():
    ema, src = build_model("stage_c", "tiny"), _randomise(build_model("stage_c", "tiny"))
    before = [p.detach().clone() for p in ema.parameters()]
    ema.update_weights_ema(src, beta=0.9)
    for b, p, s in zip(before, ema.parameters(), src.parameters()):
        assert torch.allclose(p, b * 0.9 + s * 0.1, atol=1e-6)
