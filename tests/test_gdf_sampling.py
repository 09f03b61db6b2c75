"""GDF.sample, presets and pyramid noise (docs/OFFICIAL.md, The sampling loop, Official sampling settings, Stage B)."""
import pytest
import torch
import torch.nn.functional as F

from gdf import DDIMSampler, DDPMSampler, LCMSampler, make_sampler, presets, pyramid_noise

SHAPE = (2, 3, 4, 4)


def exact_eps_model(g, x0, t_start=1.0, t_end=0.0, timesteps=20, shift=1):
    """A model returning the exact ε of ``x0`` for the noised input (finds λ from r)."""
    lam_table = g.schedule(torch.linspace(t_start, t_end, timesteps + 1), shift=shift)
    r_table = g.noise_cond(lam_table)

    def model(x, r, **inputs):
        lam = lam_table.to(r.device)[(r[:, None] - r_table.to(r.device)[None]).abs().argmin(1)]
        a, b = g.input_scaler(lam)
        reps = x.size(0) // x0.size(0)
        return (x - a.view(-1, 1, 1, 1) * x0.repeat(reps, 1, 1, 1)) / b.view(-1, 1, 1, 1)

    return model


def last_x0(gen):
    *_, (x0, _, _) = gen
    return x0


@pytest.mark.parametrize("sampler_cls", [DDPMSampler, DDIMSampler])
@pytest.mark.parametrize("cfg", [None, 3.0])
def test_exact_model_recovers_x0(sampler_cls, cfg):
    g = presets.stage_c()
    torch.manual_seed(0)
    x0 = torch.randn(SHAPE)
    model = exact_eps_model(g, x0, shift=2)
    inputs = {"c": torch.ones(2, 5)}
    out = last_x0(g.sample(model, inputs, SHAPE, sampler=sampler_cls(g), cfg=cfg, shift=2))
    assert (out - x0).abs().max().item() < 1e-4


def test_img2img_with_x_init_recovers_x0():
    g = presets.stage_c()
    x0 = torch.randn(SHAPE)
    kwargs = presets.sampling_kwargs("stage_c_img2img", g)
    x_init = g.diffuse(x0, t=torch.ones(2) * kwargs["t_start"])[0]
    model = exact_eps_model(g, x0, t_start=0.8, timesteps=kwargs["timesteps"], shift=2)
    out = last_x0(g.sample(model, {"c": torch.ones(2, 1)}, SHAPE, x_init=x_init, **kwargs))
    assert (out - x0).abs().max().item() < 1e-4


def reference_loop(g, model, inputs, uncond, shape, timesteps, cfg, cfg_rho, shift):
    """The spec's algorithm written out step by step (global RNG), for the RNG contract."""
    r_range = torch.linspace(1.0, 0.0, timesteps + 1)
    lam = g.schedule(r_range, shift=shift)[:, None].expand(-1, shape[0])
    x = torch.randn(*shape)
    merged = {k: torch.cat([v, uncond[k]]) for k, v in inputs.items()}
    outs = []
    for i in range(timesteps):
        nc = g.noise_cond(lam[i])
        p_c, p_u = model(torch.cat([x, x]), nc.repeat(2), **merged).chunk(2)
        p_cfg = torch.lerp(p_u, p_c, cfg)
        p = cfg_rho * (p_cfg * p_c.std() / (p_cfg.std() + 1e-9)) + p_cfg * (1 - cfg_rho)
        a, b = g.input_scaler(lam[i])
        a, b = a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)
        x0, eps = (x - p * b) / a, p
        a1, b1 = g.input_scaler(lam[i + 1])
        a1, b1 = a1.view(-1, 1, 1, 1), b1.view(-1, 1, 1, 1)
        sigma = (b1 ** 2 / b ** 2).sqrt() * (1 - a ** 2 / a1 ** 2).sqrt()
        x = a1 * x0 + (b1 ** 2 - sigma ** 2).sqrt() * eps + sigma * torch.randn_like(x0)
        outs.append((x0, x, p))
    return outs


def toy_model(x, r, c):
    return 0.5 * x + r.view(-1, 1, 1, 1) * c.view(-1, 1, 1, 1)


def test_sample_matches_spec_loop_and_rng_contract():
    g = presets.stage_c()
    inputs, uncond = {"c": torch.full((2,), 2.0)}, {"c": torch.full((2,), -1.0)}
    torch.manual_seed(123)
    expected = reference_loop(g, toy_model, inputs, uncond, SHAPE, 5, cfg=4, cfg_rho=0.7, shift=2)
    after_expected = torch.randn(1)
    torch.manual_seed(123)
    got = list(g.sample(toy_model, inputs, SHAPE, uncond, timesteps=5, cfg=4, shift=2))
    assert torch.equal(torch.randn(1), after_expected)  # randn(shape) + one randn_like per step
    assert len(got) == 5
    for (e0, ex, ep), (g0, gx, gp) in zip(expected, got):
        assert torch.equal(e0, g0) and torch.equal(ex, gx) and torch.equal(ep, gp)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, x, r, c, **extra):
        self.calls.append((x.size(0), c.clone(), {k: v for k, v in extra.items()}))
        return toy_model(x, r, c)


def test_cfg_formula_rho_and_schedule():
    g = presets.stage_c()
    inputs, uncond = {"c": torch.full((2,), 2.0)}, {"c": torch.full((2,), -1.0)}
    x = torch.randn(SHAPE)
    lam = g.schedule(torch.tensor([1.0]))
    nc = g.noise_cond(lam.expand(2))
    p_c, p_u = toy_model(x, nc, inputs["c"]), toy_model(x, nc, uncond["c"])
    for cfg, rho in ((3.0, 0.0), (3.0, 0.7), ([5.0, 1.0], 0.0)):
        gen = g.sample(toy_model, inputs, None, uncond, timesteps=2, cfg=cfg, cfg_rho=rho, x_init=x.clone())
        _, _, pred = next(gen)
        w = cfg if not isinstance(cfg, list) else cfg[0] * 1.0 + cfg[1] * 0.0
        p_cfg = p_u + w * (p_c - p_u)
        exp = p_cfg if rho == 0 else rho * p_cfg * p_c.std() / (p_cfg.std() + 1e-9) + (1 - rho) * p_cfg
        assert torch.allclose(pred, exp, atol=1e-5)


def test_cfg_t_stop_and_start_use_conditional_inputs_only():
    g = presets.stage_c()
    inputs, uncond = {"c": torch.full((2,), 2.0)}, {"c": torch.full((2,), -1.0)}
    rec = Recorder()
    list(g.sample(rec, inputs, SHAPE, uncond, timesteps=4, cfg=2, cfg_t_stop=0.5))  # r = 1, .75, .5, .25
    assert [n for n, _, _ in rec.calls] == [4, 4, 4, 2]
    assert torch.equal(rec.calls[-1][1], inputs["c"])
    assert torch.equal(rec.calls[0][1], torch.cat([inputs["c"], uncond["c"]]))
    rec = Recorder()
    list(g.sample(rec, inputs, SHAPE, uncond, timesteps=4, cfg=2, cfg_t_start=0.6))
    assert [n for n, _, _ in rec.calls] == [2, 2, 4, 4]
    rec = Recorder()
    list(g.sample(rec, inputs, SHAPE, uncond, timesteps=3, cfg=None))
    assert [n for n, _, _ in rec.calls] == [2, 2, 2]


def test_inputs_paired_by_key_and_merge_rules():
    g = presets.stage_c()
    x = torch.randn(SHAPE)
    inputs = {"c": torch.full((2,), 2.0), "d": torch.ones(2, 3), "lst": [torch.ones(2, 1), None],
              "sub": {"k": torch.ones(2)}, "flag": "keep"}
    uncond_a = {"c": torch.zeros(2), "d": torch.full((2, 3), 5.0), "lst": [torch.zeros(2, 1), torch.ones(2, 1)],
                "sub": {}, "flag": "x"}
    uncond_b = dict(reversed(list(uncond_a.items())))
    runs = []
    for uncond in (uncond_a, uncond_b):
        rec = Recorder()
        torch.manual_seed(0)
        runs.append(last_x0(g.sample(rec, inputs, None, uncond, timesteps=2, x_init=x.clone())))
        _, c, extra = rec.calls[0]
        assert torch.equal(extra["d"], torch.cat([inputs["d"], uncond_a["d"]]))
        assert torch.equal(extra["lst"][0], torch.ones(4, 1) * torch.tensor([1, 1, 0, 0.0]).view(4, 1))
        assert extra["lst"][1] is None and extra["flag"] is None
        assert torch.equal(extra["sub"]["k"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="missing"):
        g.sample(toy_model, inputs, SHAPE, {"c": torch.zeros(2)})
    # no unconditional inputs: zeros
    rec = Recorder()
    list(g.sample(rec, {"c": torch.full((2,), 2.0)}, SHAPE, timesteps=1))
    assert torch.equal(rec.calls[0][1], torch.tensor([2.0, 2.0, 0.0, 0.0]))


def test_sample_generator_reproducible_and_matches_global():
    g = presets.stage_c()
    inputs = {"c": torch.full((2,), 2.0)}
    state = torch.get_rng_state()
    a = last_x0(g.sample(toy_model, inputs, SHAPE, timesteps=3, generator=torch.Generator().manual_seed(4)))
    b = last_x0(g.sample(toy_model, inputs, SHAPE, timesteps=3, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(a, b)
    torch.manual_seed(4)
    c = last_x0(g.sample(toy_model, inputs, SHAPE, timesteps=3))
    assert torch.equal(a, c)
    lcm = last_x0(g.sample(toy_model, inputs, SHAPE, sampler="lcm", timesteps=3,
                           generator=torch.Generator().manual_seed(4)))
    assert lcm.shape == SHAPE


def test_send_replaces_running_values():
    g = presets.stage_c()
    rec = Recorder()
    gen = g.sample(rec, {"c": torch.full((2,), 2.0)}, SHAPE, timesteps=3, cfg=2)
    next(gen)
    gen.send({"cfg": None, "model_inputs": {"c": torch.full((2,), 7.0)}})
    assert rec.calls[1][0] == 2 and torch.equal(rec.calls[1][1], torch.full((2,), 7.0))
    with pytest.raises(ValueError, match="cannot change"):
        gen.send({"timesteps": 4})


def test_sample_argument_errors():
    g = presets.stage_c()
    inputs = {"c": torch.ones(2)}
    with pytest.raises(ValueError, match="timesteps"):
        g.sample(toy_model, inputs, SHAPE, timesteps=0)
    with pytest.raises(ValueError, match="sampler"):
        g.sample(toy_model, inputs, SHAPE, sampler="euler")
    with pytest.raises(ValueError, match="cfg"):
        g.sample(toy_model, inputs, SHAPE, cfg=[1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        g.sample(toy_model, inputs, (2, 0, 4))
    with pytest.raises(ValueError, match="shape"):
        g.sample(toy_model, inputs, (3, 3, 4, 4), x_init=torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="model_inputs"):
        g.sample(toy_model, [1], SHAPE)


# ---------------------------------------------------------------- presets
def test_presets_components():
    from gdf import AdaptiveLossWeight, CosineSchedule, CosineTNoiseCond, EpsilonTarget, P2LossWeight, VPScaler
    c = presets.stage_c()
    assert isinstance(c.schedule, CosineSchedule) and c.schedule.clamp_range == [0.0001, 0.9999]
    assert isinstance(c.input_scaler, VPScaler) and isinstance(c.target, EpsilonTarget)
    assert isinstance(c.noise_cond, CosineTNoiseCond) and isinstance(c.loss_weight, P2LossWeight)
    assert c.offset_noise == 0
    assert isinstance(presets.stage_c(adaptive_loss_weight=True).loss_weight, AdaptiveLossWeight)
    assert isinstance(presets.stage_b(adaptive_loss_weight=True).loss_weight, AdaptiveLossWeight)
    cn = presets.controlnet(offset_noise=0.1)
    assert isinstance(cn.loss_weight, P2LossWeight) and cn.offset_noise == 0.1
    with pytest.raises(ValueError, match="adaptive_loss_weight"):
        presets.stage_c(adaptive_loss_weight="True")
    with pytest.raises(ValueError, match="offset_noise"):
        presets.controlnet(offset_noise=-1)


def test_sampling_settings():
    s = presets.SAMPLING
    assert (s["stage_c_preview"]["cfg"], s["stage_c_preview"]["timesteps"], s["stage_c_preview"]["shift"]) == (5, 20, 1)
    assert (s["stage_b_preview"]["cfg"], s["stage_b_preview"]["timesteps"]) == (1.5, 10)
    assert (s["stage_c_inference"]["cfg"], s["stage_c_inference"]["shift"]) == (4, 2)
    assert (s["stage_b_inference"]["cfg"], s["stage_b_inference"]["timesteps"]) == (1.1, 10)
    assert (s["stage_c_img2img"]["timesteps"], s["stage_c_img2img"]["t_start"]) == (16, 0.8)
    assert all(v["sampler"] == "ddpm" and v["cfg_rho"] == 0.7 for v in s.values())
    g = presets.stage_b()
    kw = presets.sampling_kwargs("stage_b_inference", g)
    assert isinstance(kw["sampler"], DDPMSampler) and s["stage_b_inference"]["sampler"] == "ddpm"
    assert isinstance(make_sampler("ddim", g), DDIMSampler) and isinstance(make_sampler("lcm", g), LCMSampler)
    with pytest.raises(ValueError, match="'euler'"):
        make_sampler("euler", g)


# ---------------------------------------------------------------- pyramid noise
def manual_pyramid(eps, sizes_and_m):
    out = eps.clone()
    for (h, w), m in sizes_and_m:
        out += F.interpolate(torch.randn(eps.size(0), eps.size(1), h, w), size=eps.shape[-2:], mode="nearest") * m
    return out / (1 + sum(m ** 2 for _, m in sizes_and_m)) ** 0.5


@pytest.mark.parametrize("hw,levels", [((256, 256), [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]),
                                       ((64, 128), [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)])])
def test_pyramid_noise_levels_and_draws(hw, levels):
    eps = torch.randn(2, 4, *hw)
    first = {256: 4, 64: 2}[hw[0]]
    spec = [(size, 0.75 ** (first + k)) for k, size in enumerate(levels)]
    torch.manual_seed(9)
    expected = manual_pyramid(eps, spec)
    torch.manual_seed(9)
    got = pyramid_noise(eps)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.shape == eps.shape and not torch.equal(got, eps)


def test_pyramid_noise_normalisation_and_generator():
    eps = torch.randn(1, 4, 256, 256)
    out = pyramid_noise(eps, generator=torch.Generator().manual_seed(1))
    assert abs(out.std().item() - 1) < 0.05
    assert torch.equal(out, pyramid_noise(eps, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="epsilon"):
        pyramid_noise(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="levels"):
        pyramid_noise(eps, levels=0)


# ---------------------------------------------------------------- CUDA (skipped on CPU-only machines)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_devices_and_generators():
    g = presets.stage_c(adaptive_loss_weight=True, offset_noise=0.1)
    x0 = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16)
    for gen in (None, torch.Generator().manual_seed(0), torch.Generator(device="cuda").manual_seed(0)):
        out = g.diffuse(x0, generator=gen)
        assert all(o.device.type == "cuda" for o in out)
        assert out[3].dtype == torch.float32 and out[1].dtype != torch.float64
        assert pyramid_noise(out[1], generator=gen).device.type == "cuda"
    g.loss_weight.update_buckets(out[3], torch.ones(2, device="cuda"))
    model = exact_eps_model(g, x0.float(), timesteps=4)
    inputs = {"c": torch.ones(2, 1, device="cuda")}
    for gen in (None, torch.Generator(device="cuda").manual_seed(1)):
        res = last_x0(g.sample(model, inputs, SHAPE, timesteps=4, device="cuda", generator=gen))
        assert res.device.type == "cuda" and (res - x0.float()).abs().max().item() < 1e-3
