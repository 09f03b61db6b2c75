"""Tiny forward/backward tests: StageA (VQGAN + quantizer), EfficientNetEncoder, Previewer, ControlNet."""
import copy

import pytest
import torch

from modules.controlnet import ControlNet
from modules.effnet import EfficientNetEncoder, imagenet_normalize
from modules.previewer import Previewer
from modules.stage_a import StageA, VectorQuantize

DTYPES = [torch.float32, torch.bfloat16]


def _tiny_stage_a(seed=0):
    torch.manual_seed(seed)
    model = StageA(levels=2, bottleneck_blocks=2, c_hidden=32, c_latent=4, codebook_size=64)
    with torch.no_grad():  # gammas are zero-init (identity blocks); make every block do something
        for name, p in model.named_parameters():
            if name.endswith("gammas"):
                p.uniform_(-0.5, 0.5)
    return model


# ---------------------------------------------------------------------------------------- StageA


@pytest.mark.parametrize("dtype", DTYPES)
def test_stage_a_encode_decode(dtype):
    model = _tiny_stage_a().to(dtype).eval()
    x = torch.rand(2, 3, 16, 24, dtype=dtype)
    latent, z, idx, loss = model.encode(x)
    assert latent.shape == (2, 4, 4, 6) and latent.dtype == dtype
    assert z is None and idx is None and loss is None
    q, z, idx, loss = model.encode(x, quantize=True)
    assert q.shape == z.shape == (2, 4, 4, 6) and idx.shape == (2, 4, 6) and idx.dtype == torch.int64
    torch.testing.assert_close(z, latent)
    # quantised latent = codebook row / scale_factor
    codebook = model.vquantizer.codebook.weight
    torch.testing.assert_close(q, codebook[idx].permute(0, 3, 1, 2) / 0.43)
    out = model.decode(latent)
    assert out.shape == (2, 3, 16, 24) and out.dtype == dtype
    recon, loss = model(x, quantize=True)
    assert recon.shape == x.shape and loss.ndim == 0


def test_stage_a_scale_factor_and_decode_semantics():
    model = _tiny_stage_a().eval()
    x = torch.rand(1, 3, 8, 8)
    latent = model.encode(x)[0]
    raw = model.down_blocks(model.in_block(x))
    torch.testing.assert_close(latent, raw / 0.43)
    torch.testing.assert_close(model.decode(latent), model.out_block(model.up_blocks(latent * 0.43)))
    recon, loss = model(x)  # quantize=False decodes the unquantised latent
    assert loss is None
    torch.testing.assert_close(recon, model.decode(latent))


def test_stage_a_backward_and_checkpointing():
    model = _tiny_stage_a().train()
    x = torch.rand(2, 3, 16, 16)
    recon, loss = model(x, quantize=True)
    (recon.pow(2).mean() + loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "vquantizer.codebook.weight" in grads and "in_block.1.weight" in grads
    assert all(torch.isfinite(g).all() for g in grads.values())
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    # BatchNorm in train mode updates running stats on each pass; compare gradients only
    recon2, loss2 = model(x, quantize=True)
    (recon2.pow(2).mean() + loss2).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_stage_a_rejects_bad_input():
    model = _tiny_stage_a()
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.rand(1, 3, 10, 12))
    with pytest.raises(ValueError, match="StageA.decode"):
        model.decode(torch.rand(1, 3, 4, 4))


def test_vector_quantize_argmin_and_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantize(embedding_size=4, k=16)
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    q, (vq_loss, commit_loss), idx = vq(x, dim=1)
    flat = x.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, vq.codebook.weight.detach()).argmin(dim=1)
    assert torch.equal(idx.reshape(-1), expected)
    assert torch.equal(q.detach(), vq.codebook.weight.detach()[idx].permute(0, 3, 1, 2))
    selected = vq.codebook.weight.detach()[expected]
    torch.testing.assert_close(vq_loss, ((selected - flat) ** 2).mean())
    torch.testing.assert_close(commit_loss, vq_loss)
    # straight-through: d(sum q)/dx = 1, and q itself gives the codebook no gradient
    (q * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    assert vq.codebook.weight.grad is None or not vq.codebook.weight.grad.any()
    # the codebook learns only through vq_loss, on the selected rows
    vq.zero_grad()
    vq(x.detach(), dim=1)[1][0].backward()
    rows = vq.codebook.weight.grad.abs().sum(1) > 0
    assert set(rows.nonzero().flatten().tolist()) == set(expected.tolist())


def test_vector_quantize_ties_pick_first_index():
    vq = VectorQuantize(embedding_size=2, k=3)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    _, _, idx = vq(torch.tensor([[[[1.0]], [[0.0]]]]), dim=1)
    assert idx.flatten().tolist() == [0]


# ------------------------------------------------------------------------------- EfficientNet


@pytest.fixture(scope="module")
def effnet():
    torch.manual_seed(0)
    return EfficientNetEncoder()


def test_effnet_shapes_and_eval_mode(effnet):
    assert not effnet.training
    effnet.train()  # ignored: BN statistics and stochastic depth must stay in eval behaviour
    assert not effnet.training and not any(m.training for m in effnet.modules())
    with torch.no_grad():
        assert effnet(torch.randn(1, 3, 64, 96)).shape == (1, 16, 2, 3)
        assert effnet(torch.randn(1, 3, 70, 100)).shape == (1, 16, 3, 4)  # ceil(H/32), ceil(W/32)


def test_effnet_backward_with_checkpointing(effnet):
    x = imagenet_normalize(torch.rand(1, 3, 32, 32)).requires_grad_(True)
    effnet.set_gradient_checkpointing(True)
    try:
        effnet(x).sum().backward()
    finally:
        effnet.set_gradient_checkpointing(False)
        effnet.zero_grad(set_to_none=True)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_effnet_bfloat16(effnet):
    # bf16 effnet is very slow on CPU: run the stem, the fused-MBConv and the first MBConv+SE stages,
    # which cover every op type of the backbone, plus the mapper on a matching feature map.
    stages = copy.deepcopy(effnet.backbone[:5]).to(torch.bfloat16)
    with torch.no_grad():
        out = stages(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
        assert out.shape == (1, 128, 2, 2) and out.dtype == torch.bfloat16
        mapper = copy.deepcopy(effnet.mapper).to(torch.bfloat16)
        assert mapper(torch.randn(1, 1280, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_imagenet_normalize():
    out = imagenet_normalize(torch.full((1, 3, 2, 2), 0.485))
    assert out[0, 0].abs().max() < 1e-6
    with pytest.raises(ValueError, match="imagenet_normalize"):
        imagenet_normalize(torch.rand(1, 1, 2, 2))


# -------------------------------------------------------------------------------- Previewer


@pytest.mark.parametrize("dtype", DTYPES)
def test_previewer_upsamples_8x(dtype):
    torch.manual_seed(0)
    model = Previewer(c_in=16, c_hidden=32, c_out=3).to(dtype)
    x = torch.randn(2, 16, 3, 5, dtype=dtype)
    out = model(x)
    assert out.shape == (2, 3, 24, 40) and out.dtype == dtype
    out.float().sum().backward()
    assert model.blocks[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, 24, 40)


# -------------------------------------------------------------------------------- ControlNet


@pytest.fixture(scope="module")
def cnet_effnet():
    torch.manual_seed(0)
    return ControlNet(c_in=1, c_proj=64, proj_blocks=[0, 3, 5])


def _perturb_projections(model):
    with torch.no_grad():
        for proj in model.projections:
            proj[-1].weight.normal_(0, 0.02)


def test_controlnet_effnet_zero_init_output_list(cnet_effnet):
    with torch.no_grad():
        out = cnet_effnet(torch.randn(2, 1, 64, 64))
    assert len(out) == 6
    assert [o is None for o in out] == [False, True, True, False, True, False]
    for o in (out[0], out[3], out[5]):
        assert o.shape == (2, 64, 2, 2) and not o.any()


def test_controlnet_stem_has_no_padding(cnet_effnet):
    stem = cnet_effnet.backbone[0][0]
    assert stem.padding == (0, 0) and stem.bias is None and stem.in_channels == 1
    with torch.no_grad():
        assert cnet_effnet.backbone[0](torch.randn(1, 1, 96, 96)).shape == (1, 24, 47, 47)
    # c_in == 3 keeps torchvision's padded stem
    with torch.device("meta"):
        rgb = ControlNet(c_in=3, c_proj=64, proj_blocks=[0])
    assert rgb.backbone[0][0].padding == (1, 1)


def test_controlnet_stem_init_for_more_channels():
    with torch.device("meta"):
        meta = ControlNet(c_in=4, c_proj=8, proj_blocks=[0])
    assert meta.backbone[0][0].weight.shape == (24, 4, 3, 3)
    torch.manual_seed(0)
    model = ControlNet(c_in=4, c_proj=8, proj_blocks=[0])
    weight = model.backbone[0][0].weight
    assert not weight[:, 3:].any() and weight[:, :3].any()


def test_controlnet_effnet_backbone_stays_eval_but_trains(cnet_effnet):
    cnet_effnet.train()
    assert cnet_effnet.training and cnet_effnet.projections.training
    assert not any(m.training for m in cnet_effnet.backbone.modules())
    _perturb_projections(cnet_effnet)
    try:
        out = cnet_effnet(torch.randn(1, 1, 64, 64))
        assert out[0].abs().sum() > 0
        sum(o.sum() for o in out if o is not None).backward()
        assert cnet_effnet.backbone[0][0].weight.grad is not None
        assert cnet_effnet.backbone[0][0].weight.grad.abs().sum() > 0
    finally:
        cnet_effnet.zero_grad(set_to_none=True)
        with torch.no_grad():
            for proj in cnet_effnet.projections:
                proj[-1].weight.zero_()


@pytest.mark.parametrize("dtype", DTYPES)
def test_controlnet_simple(dtype):
    torch.manual_seed(0)
    model = ControlNet(c_in=8, c_proj=64, proj_blocks=list(range(4)), bottleneck_mode="simple").to(dtype)
    x = torch.randn(2, 8, 6, 6, dtype=dtype)
    out = model(x)
    assert len(out) == 4 and all(o.shape == (2, 64, 6, 6) and o.dtype == dtype and not o.any() for o in out)
    _perturb_projections(model)
    out = model(x)
    sum(o.float().sum() for o in out).backward()
    assert model.backbone[0].weight.grad is not None and model.backbone[0].weight.grad.abs().sum() > 0


def test_controlnet_large_forward():
    # the 'large' backbone has fixed widths (~200M parameters): allocate without init work, then fill
    # cheaply, and run a no-grad forward on a tiny input
    with torch.device("meta"):
        model = ControlNet(c_in=16, c_proj=64, proj_blocks=[1], bottleneck_mode="large")
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # LayerNorm weight
                p.fill_(1.0)
            else:
                p.uniform_(-1.0, 1.0, generator=gen).mul_(p[0].numel() ** -0.5)
        assert model.backbone[3].blocks[0].weight.shape == (1024,)  # affine LayerNorm2d
        out = model(torch.randn(1, 16, 3, 3))
    assert len(out) == 2 and out[0] is None and out[1].shape == (1, 64, 3, 3)
    assert torch.isfinite(out[1]).all() and out[1].abs().sum() > 0


def test_controlnet_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = ControlNet(c_in=8, c_proj=16, proj_blocks=[0, 2], bottleneck_mode="simple")
    _perturb_projections(model)
    x = torch.randn(1, 8, 5, 5)
    out = model(x)
    (out[0].sum() + out[2].pow(2).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    out2 = model(x)
    torch.testing.assert_close(out2[2], out[2])
    (out2[0].sum() + out2[2].pow(2).sum()).backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_controlnet_argument_errors():
    with pytest.raises(ValueError, match="proj_blocks is required"):
        ControlNet(c_in=3)
    with pytest.raises(ValueError, match="bottleneck_mode"):
        ControlNet(c_in=3, proj_blocks=[0], bottleneck_mode="huge")
    with pytest.raises(ValueError, match="duplicate"):
        ControlNet(c_in=8, proj_blocks=[1, 1], bottleneck_mode="simple")
    with pytest.raises(ValueError, match="non-negative"):
        ControlNet(c_in=8, proj_blocks=[-1], bottleneck_mode="simple")
    model = ControlNet(c_in=8, c_proj=4, proj_blocks=[0], bottleneck_mode="simple")
    with pytest.raises(ValueError, match=r"\(B,8,H,W\)"):
        model(torch.randn(1, 3, 4, 4))


def test_controlnet_exports_filters():
    import modules.controlnet as cn

    assert cn.CannyFilter.__name__ == "CannyFilter"
    with pytest.raises(AttributeError):
        cn.NoSuchFilter
