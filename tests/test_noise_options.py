"""offset_noise, input_perturbation, timestep_distribution: the diffused input changes as specified."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from core.errors import UserError
from gdf import presets
from train.diffusion_loss import DiffusionLoss
from train.noise_options import NoiseConfig, NoiseOptions

X0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def gens(seed=5):
    return [torch.Generator().manual_seed(seed + i) for i in range(len(X0))]


def run(**keys):
    """(network inputs, noise conds, per-sample loss) of one loss call with these noise keys."""
    cfg = SimpleNamespace(**{**vars(NoiseConfig()), **keys})
    gdf = presets.stage_c()
    noise = NoiseOptions(cfg)
    noise.apply_offset(gdf)
    seen = {}

    def model(x, r):
        seen["x"], seen["r"] = x.clone(), r.clone()
        return torch.zeros_like(x)

    loss = DiffusionLoss(gdf, lambda fn: None, contextlib.nullcontext, noise=noise)
    _, per_sample = loss(model, X0, gens())
    return seen["x"], seen["r"], per_sample, gdf


def test_offset_noise_adds_a_per_channel_offset():
    x, _, _, gdf = run(offset_noise=0.3)
    for i, g in enumerate(gens()):  # by hand: eps, then offset (B=1, C, 1, 1), then t, from the sample's generator
        eps = torch.randn(1, 3, 4, 4, generator=g)
        offset = torch.randn(1, 3, 1, 1, generator=g)
        log_snr = gdf.schedule(1, generator=g)
        a, b = gdf.input_scaler(log_snr)
        assert torch.allclose(x[i:i + 1], a * X0[i:i + 1] + b * (eps + 0.3 * offset), atol=1e-6)


def test_input_perturbation_changes_the_input_not_the_target():
    x0, r0, target0, gdf = run()
    x, r, target, _ = run(input_perturbation=0.1)
    assert torch.equal(r, r0) and torch.equal(target, target0)  # same t, same target eps
    # the difference is b * 0.1 * xi with xi the draw after the diffusion's
    for i, g in enumerate(gens()):
        _, _, _, log_snr, _, _ = gdf.diffuse(X0[i:i + 1], generator=g)
        xi = torch.randn(1, 3, 4, 4, generator=g)
        b = gdf.input_scaler(log_snr)[1]
        assert torch.allclose(x[i:i + 1] - x0[i:i + 1], b * 0.1 * xi, atol=1e-6)


def test_logit_normal_timesteps():
    x, r, _, gdf = run(timestep_distribution="logit_normal", timestep_mean=0.5, timestep_std=0.8)
    for i, g in enumerate(gens()):
        t = torch.sigmoid(0.5 + 0.8 * torch.randn(1, generator=g)).clamp(0.001, 1.0)
        eps = torch.randn(1, 3, 4, 4, generator=g)
        log_snr = gdf.schedule(t)
        a, b = gdf.input_scaler(log_snr)
        assert torch.allclose(r[i], gdf.noise_cond(log_snr)[0])
        assert torch.allclose(x[i:i + 1], a * X0[i:i + 1] + b * eps, atol=1e-6)
    # the draws are spread: over many samples the mean of t is near sigmoid's image of the mean
    g = torch.Generator().manual_seed(1)
    ts = torch.cat([NoiseOptions(SimpleNamespace(timestep_distribution="logit_normal", timestep_mean=0.5,
                                                 timestep_std=0.8)).draw_t(g, torch.device("cpu")) for _ in range(2000)])
    assert abs(float(torch.logit(ts).mean()) - 0.5) < 0.06


def test_defaults_are_the_official_draws():
    x, r, _, gdf = run()
    for i, g in enumerate(gens()):
        noised, *_ = gdf.diffuse(X0[i:i + 1], generator=g)
        assert torch.equal(x[i:i + 1], noised)


@pytest.mark.parametrize("keys, message", [
    ({"offset_noise": 1.0}, "'offset_noise' must be in \\[0, 1\\)"),
    ({"input_perturbation": -0.1}, "'input_perturbation' must be in \\[0, 1\\)"),
    ({"timestep_distribution": "logit_normal", "timestep_std": 0.0}, "'timestep_std' must be > 0"),
    ({"timestep_mean": 1.0}, "apply to timestep_distribution: logit_normal"),
])
def test_validation(keys, message):
    with pytest.raises(UserError, match=message):
        NoiseConfig(**keys).validate_noise()
