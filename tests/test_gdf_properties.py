"""Property tests (hypothesis) for gdf invariants."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdf import (
    AdaptiveLossWeight, CosineSchedule, CosineSchedule2, CosineTNoiseCond, EDMSampleSchedule, EpsilonTarget,
    LERPScaler, LinearSchedule, RectifiedFlowsSchedule, RectifiedFlowsTarget, SqrtSchedule,
    StableDiffusionSchedule, VPScaler, VTarget, X0Target,
)

FAST = settings(max_examples=40, deadline=None)
logsnrs = st.lists(st.floats(-12, 12, allow_nan=False), min_size=1, max_size=16)
times = st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=32)

SCHEDULES = [CosineSchedule(), CosineSchedule(norm_instead=True), CosineSchedule2(), SqrtSchedule(),
             RectifiedFlowsSchedule(), EDMSampleSchedule(), LinearSchedule(), StableDiffusionSchedule()]


@FAST
@given(logsnrs)
def test_vp_scaler_preserves_variance(values):
    a, b = VPScaler()(torch.tensor(values))
    assert torch.allclose(a ** 2 + b ** 2, torch.ones(len(values)), atol=1e-6)


@FAST
@given(st.lists(st.floats(-6, 6, allow_nan=False), min_size=1, max_size=8), st.integers(0, 2 ** 31 - 1))
@pytest.mark.parametrize("target,scaler", [(EpsilonTarget(), VPScaler()), (X0Target(), VPScaler()),
                                           (VTarget(), VPScaler()), (RectifiedFlowsTarget(), LERPScaler())])
def test_target_round_trips(target, scaler, values, seed):
    gen = torch.Generator().manual_seed(seed)
    lam = torch.tensor(values, dtype=torch.float64)
    x0 = torch.randn(len(values), 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(len(values), 3, generator=gen, dtype=torch.float64)
    a, b = scaler(lam)
    a, b = a.view(-1, 1), b.view(-1, 1)
    noised = a * x0 + b * eps
    pred = target(x0, eps, lam, a, b)
    assert torch.allclose(target.x0(noised, pred, lam, a, b), x0, atol=1e-6)
    assert torch.allclose(target.epsilon(noised, pred, lam, a, b), eps, atol=1e-6)


@FAST
@given(times, st.sampled_from([1, 0.5, 2, 4]))
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_logsnr_monotone_non_increasing(schedule, values, shift):
    t = torch.tensor(sorted(values))
    lam = schedule(t, shift=shift)
    assert lam.dtype == torch.float32 and torch.isfinite(lam).all()
    assert (lam[1:] <= lam[:-1]).all()


@FAST
@given(st.lists(st.floats(0.05, 0.95), min_size=1, max_size=16))
def test_cosine_noise_cond_inverts_schedule(values):
    t = torch.tensor(values)
    assert torch.allclose(CosineTNoiseCond()(CosineSchedule()(t)), t, atol=1e-4)


@FAST
@given(logsnrs)
def test_adaptive_index_brackets_logsnr(values):
    w = AdaptiveLossWeight()
    lam = torch.tensor(values)
    idx = w.index(lam)
    edges = torch.cat([torch.tensor([-float("inf")]), w.bucket_ranges, torch.tensor([float("inf")])])
    assert ((edges[idx] < lam) | (idx == 0)).all() and (lam <= edges[idx + 1]).all()
