"""gdf components against hand-computed values (docs/OFFICIAL.md, GDF and sampling)."""
import math

import pytest
import torch

import gdf
from gdf import (
    GDF, AdaptiveLossWeight, AdaptiveTrainSchedule, ComposedLossWeight, ConstantLossWeight, CosineSchedule,
    CosineSchedule2, CosineTNoiseCond, DDIMSampler, DDPMSampler, DebiasedLossWeight, DiscreteNoiseCond,
    EDMNoiseCond, EDMSampleSchedule, EDMSigmaNoiseCond, EDMTrainSchedule, EpsilonTarget, InterpolatedSchedule,
    LCMSampler, LERPScaler, LinearSchedule, LogSNRNoiseCond, MinSNRLossWeight, MinSNRPlusOneLossWeight,
    P2LossWeight, RectifiedFlowsNoiseCond, RectifiedFlowsSchedule, RectifiedFlowsTarget, SechLossWeight,
    SigmoidLossWeight, SigmoidNoiseCond, SNRLossWeight, SNRPlusOneLossWeight, SqrtSchedule,
    StableDiffusionNoiseCond, StableDiffusionSchedule, TruncatedSNRLossWeight, VPScaler, VTarget, X0Target,
    presets, pyramid_noise,
)

T6 = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def sc_gdf(**kw):
    return presets.stage_c(**kw)


# ---------------------------------------------------------------- schedule (§2.2, §8.3)
def test_cosine_worked_numbers_and_limits():
    sched = CosineSchedule()
    assert sched.limits == pytest.approx([-9.210240, 9.210074], abs=2e-6)
    lam = sched(T6)
    assert lam.dtype == torch.float32
    assert lam.tolist() == pytest.approx([9.2101, 2.1829, 0.6080, -0.6597, -2.2652, -9.2102], abs=1e-4)
    lam2 = sched(T6, shift=2)
    assert lam2.tolist() == pytest.approx([7.8238, 0.7966, -0.7783, -2.0460, -3.6515, -9.2102], abs=1e-4)
    nc = CosineTNoiseCond()
    assert nc(lam2).tolist() == pytest.approx([0.0071, 0.3715, 0.6179, 0.7785, 0.8975, 0.9936], abs=1e-4)
    assert nc(lam).tolist() == pytest.approx([0.0023, 0.2, 0.4, 0.6, 0.8, 0.9936], abs=1e-4)


def test_cosine_formula_by_hand():
    s = 0.008
    for t in (0.1, 0.5, 0.9):
        var = math.cos((s + t) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
        var = min(max(var, 1e-4), 0.9999)
        assert CosineSchedule()(torch.tensor([t])).item() == pytest.approx(math.log(var / (1 - var)), abs=1e-4)


def test_schedule_shift_sign_and_limits_clamp():
    sched = CosineSchedule()
    lam = sched(torch.tensor([0.5]))
    assert sched(torch.tensor([0.5]), shift=3).item() == pytest.approx(lam.item() + 2 * math.log(1 / 3), abs=1e-5)
    # the constructor shift multiplies the call's shift
    assert CosineSchedule(shift=3)(torch.tensor([0.5])).item() == pytest.approx(
        lam.item() + 2 * math.log(1 / 3), abs=1e-5)
    # limits come from shift 1 and clamp shifted values
    assert sched(torch.tensor([1.0]), shift=4).item() == pytest.approx(sched.limits[0])
    assert sched(torch.tensor([0.0]), shift=0.25).item() == pytest.approx(sched.limits[1])


def test_schedule_random_t_is_one_rand_call():
    torch.manual_seed(3)
    expected_t = ((1 - torch.rand(5)) + 0.001).clamp(0.001, 1.0)
    after = torch.rand(1)
    torch.manual_seed(3)
    lam = CosineSchedule()(5)
    assert torch.equal(lam, CosineSchedule()(expected_t))
    assert torch.equal(torch.rand(1), after)  # exactly one rand(5) call was consumed


def test_schedule_float32_and_discrete_steps():
    sched = CosineSchedule()
    assert sched(T6.double()).dtype == torch.float32
    disc = CosineSchedule(discrete_steps=11)
    assert torch.equal(disc(torch.tensor([0.33])), sched(torch.tensor([0.3])))
    assert torch.equal(disc(torch.tensor([3])), sched(torch.tensor([0.3])))


@pytest.mark.parametrize("bad", [(0.0, 0.5), (0.1, 1.0), (0.6, 0.4), (-0.1, 0.9), (0.5,)])
def test_cosine_clamp_range_errors(bad):
    with pytest.raises(ValueError, match="clamp_range"):
        CosineSchedule(clamp_range=bad)


def test_schedule_t_type_error():
    with pytest.raises(ValueError, match="t must be"):
        CosineSchedule()("0.5")
    with pytest.raises(ValueError, match="shift"):
        CosineSchedule()(torch.tensor([0.5]), shift=0)


def test_other_schedules_by_hand():
    t = torch.tensor([0.25])
    assert LinearSchedule()(t).item() == pytest.approx(0.25 * (-20) + 10)
    assert RectifiedFlowsSchedule()(t).item() == pytest.approx(math.log(0.75 ** 2 / 0.25 ** 2), abs=1e-5)
    var = 1 - math.sqrt(0.25 + 1e-4)
    assert SqrtSchedule()(t).item() == pytest.approx(math.log(var / (1 - var)), abs=1e-5)
    tmin, tmax = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    assert CosineSchedule2()(t).item() == pytest.approx(-2 * math.log(math.tan(tmin + 0.25 * (tmax - tmin))), abs=1e-4)
    sigma = (80 ** (1 / 7) + 0.75 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert EDMSampleSchedule()(t).item() == pytest.approx(math.log(1 / sigma ** 2), abs=1e-4)
    lin = LinearSchedule()
    interp = InterpolatedSchedule(lin, LinearSchedule(logsnr_range=[-4, 4]))
    assert interp(t).item() == pytest.approx(5.0 * 0.25 + 2.0 * 0.75, abs=1e-5)


def test_edm_train_schedule_sign_and_rejects_t():
    with pytest.warns(UserWarning):
        sched = EDMTrainSchedule()
    assert sched.limits is None
    torch.manual_seed(0)
    n = torch.randn(4)
    torch.manual_seed(0)
    assert torch.allclose(sched(4), -2 * (1.2 * n + 1.2))
    with pytest.raises(ValueError, match="t must be None"):
        sched(torch.tensor([0.5]))


def test_stable_diffusion_schedule_and_noise_cond_are_inverse():
    sched, nc = StableDiffusionSchedule(), StableDiffusionNoiseCond()
    alphas = 1 - (0.00085 ** 0.5 * 1 + 0.012 ** 0.5 * 0) ** 2
    assert sched(torch.tensor([0.0])).item() == pytest.approx(math.log(alphas / (1 - alphas)), rel=1e-4)
    t = torch.tensor([0.1, 0.37, 0.5, 0.83])
    assert torch.allclose(nc(sched(t)), t, atol=1e-3)


def test_adaptive_train_schedule_sampling_update_state():
    with pytest.warns(UserWarning):
        sched = AdaptiveTrainSchedule(buckets=4)
    sched.bucket_probs = torch.tensor([0.0, 0.0, 1.0, 0.0])
    lam = sched(100)
    assert ((lam >= 0) & (lam < 5)).all()
    sched.update_buckets(torch.tensor([-7.0, 6.0, 6.5, 20.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]), beta=0.5)
    # bucket 0 <- -7 and (out of range) 20; the last write wins; bucket 3 <- 6.5 (last)
    assert sched.bucket_probs.tolist() == pytest.approx([0.0 * 0.5 + 4.0 * 0.5, 0.0, 1.0, 0.0 * 0.5 + 3.0 * 0.5])
    state = sched.state_dict()
    with pytest.warns(UserWarning):
        other = AdaptiveTrainSchedule(buckets=4)
    other.load_state_dict({k: v.tolist() for k, v in state.items()})
    assert torch.equal(other.bucket_probs, sched.bucket_probs)


# ---------------------------------------------------------------- scalers, targets (§3, §4)
def test_vp_and_lerp_scalers():
    lam = torch.tensor([-3.0, 0.0, 2.5])
    a, b = VPScaler()(lam)
    assert torch.allclose(a, lam.sigmoid().sqrt()) and torch.allclose(b, (1 - lam.sigmoid()).sqrt())
    a, b = LERPScaler()(lam)
    assert torch.allclose(a + b, torch.ones(3))
    ratio = (a[[0, 2]] ** 2 / (1 - a[[0, 2]]) ** 2).log()
    assert torch.allclose(ratio, lam[[0, 2]], atol=1e-4)
    assert a[1].item() == pytest.approx(1 + (2 - math.sqrt(4 + 4e-3)) / 2e-3, abs=1e-4)  # float32 cancellation


def test_stretched_limits():
    g = sc_gdf()
    limits = g.setup_limits()
    a_lo, b_lo = VPScaler().scalers(torch.tensor([g.schedule.limits[0]]))
    assert limits[0] == pytest.approx(a_lo.item()) and limits[3] == pytest.approx(b_lo.item())
    a, _ = g.input_scaler(torch.tensor(g.schedule.limits))
    assert a.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_target_table():
    x0, eps = torch.tensor([2.0]), torch.tensor([-1.0])
    a, b = torch.tensor([0.6]), torch.tensor([0.8])
    lam = torch.tensor([0.0])
    assert EpsilonTarget()(x0, eps, lam, a, b).item() == -1.0
    assert X0Target()(x0, eps, lam, a, b).item() == 2.0
    assert VTarget()(x0, eps, lam, a, b).item() == pytest.approx(0.6 * -1 - 0.8 * 2)
    assert RectifiedFlowsTarget()(x0, eps, lam, a, b).item() == -3.0
    noised, pred = torch.tensor([1.0]), torch.tensor([0.5])
    assert EpsilonTarget().x0(noised, pred, lam, a, b).item() == pytest.approx((1 - 0.4) / 0.6)
    assert X0Target().epsilon(noised, pred, lam, a, b).item() == pytest.approx((1 - 0.3) / 0.8)
    assert RectifiedFlowsTarget().x0(noised, pred, lam, a, b).item() == pytest.approx(1 - 0.4)
    assert RectifiedFlowsTarget().epsilon(noised, pred, lam, a, b).item() == pytest.approx(1 + 0.3)


# ---------------------------------------------------------------- noise conds (§5)
def test_noise_cond_shift_sign_and_variants():
    lam = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(CosineTNoiseCond(shift=2)(lam), CosineTNoiseCond()(lam + 2 * math.log(2)))
    assert torch.allclose(EDMNoiseCond()(lam), -lam / 8)
    assert torch.allclose(SigmoidNoiseCond()(lam), (-lam).sigmoid())
    assert torch.equal(LogSNRNoiseCond()(lam), lam)
    assert torch.allclose(EDMSigmaNoiseCond(sigma_data=0.5)(lam), (-lam / 2).exp() * 0.5)
    assert torch.allclose(RectifiedFlowsNoiseCond()(lam[[0, 2]]), LERPScaler()(lam[[0, 2]])[0])
    disc = DiscreteNoiseCond(CosineTNoiseCond(), steps=1000)
    out = disc(CosineSchedule()(torch.tensor([0.5])))
    assert out.dtype == torch.int64 and out.item() in (499, 500)
    assert CosineTNoiseCond().clamp_range == [0, 1]


# ---------------------------------------------------------------- loss weights (§6)
def test_p2_default_is_b_squared_and_loss_shift_sign():
    lam = torch.linspace(-9, 9, 7)
    assert torch.allclose(P2LossWeight()(lam), VPScaler()(lam)[1] ** 2, atol=1e-6)
    assert torch.allclose(P2LossWeight()(lam, shift=2), P2LossWeight()(lam + 2 * math.log(2)))
    assert torch.allclose(P2LossWeight(k=2, gamma=0.5, s=0.5)(lam), (2 + (lam * 0.5).exp()) ** -0.5)
    assert torch.allclose(P2LossWeight()(lam, clamp_range=[0.2, 0.5]), P2LossWeight()(lam).clamp(0.2, 0.5))


def test_other_loss_weights():
    lam = torch.tensor([-1.0, 0.5, 2.0])
    snr = lam.exp()
    assert torch.allclose(ConstantLossWeight(3)(lam), torch.full((3,), 3.0))
    assert torch.allclose(SNRLossWeight()(lam), snr)
    assert torch.allclose(SNRPlusOneLossWeight()(lam), snr + 1)
    assert torch.allclose(MinSNRLossWeight(max_snr=2)(lam), snr.clamp(max=2))
    assert torch.allclose(MinSNRPlusOneLossWeight(max_snr=2)(lam), (snr + 1).clamp(max=2))
    assert torch.allclose(TruncatedSNRLossWeight(min_snr=1)(lam), snr.clamp(min=1))
    assert torch.allclose(SechLossWeight()(lam), 1 / (lam / 2).cosh())
    assert torch.allclose(DebiasedLossWeight()(lam), 1 / snr.sqrt())
    assert torch.allclose(SigmoidLossWeight(s=2)(lam), (lam * 2).sigmoid())
    composed = ComposedLossWeight(div=[SNRPlusOneLossWeight()], mul=SNRLossWeight())
    assert torch.allclose(composed(lam), snr / (snr + 1))


def test_adaptive_loss_weight_indexing():
    w = AdaptiveLossWeight()
    assert w.bucket_ranges.numel() == 299 and w.bucket_losses.numel() == 300
    edges = w.bucket_ranges
    lam = torch.tensor([-11.0, -10.0, edges[5].item(), (edges[5] + 1e-3).item(), 10.0, 10.5])
    assert w.index(lam).tolist() == [0, 0, 5, 6, 298, 299]
    assert torch.equal(w(lam), torch.ones(6))


def test_adaptive_loss_weight_update_and_weight():
    w = AdaptiveLossWeight()
    lam = torch.tensor([-11.0, 0.01, 0.02, 11.0])
    idx = w.index(lam).tolist()
    assert idx[1] == idx[2]  # same bucket: only the last update survives
    w.update_buckets(lam, torch.tensor([3.0, 5.0, 7.0, 1e-9]))
    expected = w.bucket_losses.clone()
    assert expected[idx[0]].item() == pytest.approx(0.99 + 0.03)
    assert expected[idx[1]].item() == pytest.approx(0.99 + 0.07)
    weights = w(lam)
    assert weights[0].item() == pytest.approx(1 / 1.02)
    assert weights[3].item() == pytest.approx(1 / (0.99 + 1e-11), rel=1e-6)
    w.bucket_losses[idx[3]] = 1e-9
    assert w(lam)[3].item() == pytest.approx(1e7)  # clamped to weight_range
    with pytest.raises(ValueError, match="loss"):
        w.update_buckets(lam, torch.ones(3))


def test_adaptive_loss_weight_state_round_trip():
    w = AdaptiveLossWeight()
    w.update_buckets(torch.tensor([-3.0, 4.0]), torch.tensor([0.2, 0.4]))
    fresh = AdaptiveLossWeight()
    fresh.load_state_dict(w.state_dict())
    assert torch.equal(fresh.bucket_losses, w.bucket_losses)
    info_json = {"bucket_ranges": w.bucket_ranges.tolist(), "bucket_losses": w.bucket_losses.tolist()}
    fresh2 = AdaptiveLossWeight()
    fresh2.load_state_dict(info_json)
    assert torch.equal(fresh2.bucket_losses, w.bucket_losses)
    assert torch.equal(fresh2.bucket_ranges, w.bucket_ranges)
    state = w.state_dict()
    state["bucket_losses"][0] = 123.0  # a copy: the live state is untouched
    assert w.bucket_losses[0].item() != 123.0
    with pytest.raises(ValueError, match="bucket_losses"):
        fresh.load_state_dict({"bucket_ranges": [0.0, 1.0], "bucket_losses": [1.0]})
    with pytest.raises(ValueError, match="bucket_ranges"):
        fresh.load_state_dict({"bucket_losses": [1.0]})


# ---------------------------------------------------------------- diffuse / undiffuse (§1.1)
def test_diffuse_rng_order_eps_then_t():
    g = sc_gdf()
    x0 = torch.randn(3, 4, 5, 5)
    torch.manual_seed(11)
    eps = torch.randn_like(x0)
    t = ((1 - torch.rand(3)) + 0.001).clamp(0.001, 1)
    torch.manual_seed(11)
    noised, eps_out, target, lam, nc, w = g.diffuse(x0)
    assert torch.equal(eps_out, eps) and torch.equal(target, eps)
    assert torch.equal(lam, g.schedule(t))
    a, b = VPScaler()(lam)
    assert torch.allclose(noised, x0 * a.view(-1, 1, 1, 1) + eps * b.view(-1, 1, 1, 1))
    assert torch.equal(nc, CosineTNoiseCond()(lam)) and torch.allclose(w, b ** 2)
    x0_rec, eps_rec = g.undiffuse(noised, lam, eps)
    assert torch.allclose(x0_rec, x0, atol=1e-3) and torch.equal(eps_rec, eps)


def test_diffuse_offset_noise_rng_order():
    g = sc_gdf(offset_noise=0.1)
    x0 = torch.randn(2, 3, 4, 4)
    torch.manual_seed(5)
    eps = torch.randn_like(x0)
    offset = torch.randn(2, 3, 1, 1)
    t = ((1 - torch.rand(2)) + 0.001).clamp(0.001, 1)
    torch.manual_seed(5)
    _, eps_out, _, lam, _, _ = g.diffuse(x0)
    assert torch.equal(eps_out, eps + offset * 0.1)
    assert torch.equal(lam, g.schedule(t))
    given = torch.ones(2, 3, 1, 1)
    _, eps_out, _, _, _, _ = g.diffuse(x0, epsilon=eps, t=t, offset=given)
    assert torch.equal(eps_out, eps + given * 0.1)
    with pytest.raises(ValueError, match="offset"):
        sc_gdf().diffuse(x0, offset=given)


def test_diffuse_given_t_and_shifts():
    g = sc_gdf()
    x0 = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([0.3, 0.7])
    _, _, _, lam, nc, w = g.diffuse(x0, t=t, shift=2, loss_shift=3)
    assert torch.allclose(lam, g.schedule(t) + 2 * math.log(0.5))
    assert torch.allclose(w, P2LossWeight()(lam + 2 * math.log(3)))
    assert torch.allclose(nc, CosineTNoiseCond()(lam))


def test_diffuse_argument_errors():
    g = sc_gdf()
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="epsilon"):
        g.diffuse(x0, epsilon=torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="t must be"):
        g.diffuse(x0, t=torch.zeros(3))
    with pytest.raises(ValueError, match="t must be"):
        g.diffuse(x0, t=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="x0"):
        g.diffuse([1, 2])
    with pytest.raises(ValueError, match="loss_shift"):
        g.diffuse(x0, loss_shift=-1)


def test_diffuse_dtypes_bf16():
    g = sc_gdf(adaptive_loss_weight=True)
    x0 = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    noised, eps, target, lam, nc, w = g.diffuse(x0)
    assert eps.dtype == torch.bfloat16 and lam.dtype == torch.float32
    assert nc.dtype == torch.float32 and w.dtype == torch.float32
    assert noised.dtype != torch.float64 and target.dtype == torch.bfloat16
    _, _, _, lam64, _, _ = g.diffuse(x0, t=torch.tensor([0.2, 0.4], dtype=torch.float64))
    assert lam64.dtype == torch.float32


def test_generator_reproducible_and_leaves_global_rng():
    g = sc_gdf(offset_noise=0.1)
    x0 = torch.randn(3, 2, 4, 4)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out1 = g.diffuse(x0, generator=torch.Generator().manual_seed(7))
    out2 = g.diffuse(x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)
    out3 = g.diffuse(x0, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(out1[1], out3[1])
    # same draws, same order as the global RNG would give
    torch.manual_seed(7)
    ref = g.diffuse(x0)
    for a, b in zip(out1, ref):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- samplers (§7)
def _vp(lam):
    a2 = 1 / (1 + math.exp(-lam))
    return math.sqrt(a2), math.sqrt(1 - a2)


def test_ddim_ddpm_lcm_step_formula():
    g = sc_gdf()
    x0, eps, x = torch.tensor([[0.5]]), torch.tensor([[-0.3]]), torch.tensor([[0.0]])
    lam, lam_prev = torch.tensor([0.0]), torch.tensor([2.0])
    (a, b), (a1, b1) = _vp(0.0), _vp(2.0)
    torch.manual_seed(1)
    z = torch.randn(1, 1)
    torch.manual_seed(1)
    out = DDPMSampler(g)(x, x0, eps, lam, lam_prev)
    sigma = math.sqrt(b1 ** 2 / b ** 2) * math.sqrt(1 - a ** 2 / a1 ** 2)
    assert out.item() == pytest.approx(a1 * 0.5 + math.sqrt(b1 ** 2 - sigma ** 2) * -0.3 + sigma * z.item(), abs=1e-6)
    torch.manual_seed(1)
    out = DDIMSampler(g)(x, x0, eps, lam, lam_prev)
    assert out.item() == pytest.approx(a1 * 0.5 + b1 * -0.3, abs=1e-6)
    after_ddim = torch.randn(1, 1)
    torch.manual_seed(1)
    torch.randn(1, 1)
    assert torch.equal(after_ddim, torch.randn(1, 1))  # DDIM consumed one randn_like with eta = 0
    torch.manual_seed(1)
    out = DDIMSampler(g)(x, x0, eps, lam, lam_prev, eta=0.5)
    assert out.item() == pytest.approx(
        a1 * 0.5 + math.sqrt(b1 ** 2 - (0.5 * sigma) ** 2) * -0.3 + 0.5 * sigma * z.item(), abs=1e-6)
    torch.manual_seed(1)
    out = LCMSampler(g)(x, x0, eps, lam, lam_prev)
    assert out.item() == pytest.approx(a1 * 0.5 + z.item() * b1, abs=1e-6)
