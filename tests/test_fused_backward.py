"""fused_backward (core/fused_backward.py): the per-parameter steps inside backward equal the normal
step (bitwise for AdamW / Adafactor on the CPU), gradients are freed, refused combinations."""
from __future__ import annotations

import pytest
import torch
from torch import nn


def _run(fused: bool, optimizer: str, sr: bool = False, poison: int = -1, steps: int = 4):
    from core.fused_backward import FusedBackward
    from core.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    if sr:
        model = model.to(torch.bfloat16)
    opt = build_optimizer(model.parameters(), 1e-2, OptimConfig(optimizer=optimizer, stochastic_rounding=sr))
    hooks = FusedBackward(opt, list(model.parameters())) if fused else None
    g = torch.Generator().manual_seed(1)
    losses, norms = [], []
    for i in range(steps):
        x = torch.randn(6, 8, generator=g).to(model[0].weight.dtype)
        loss = model(x).float().square().mean()
        if i == poison:  # an infinite gradient reaches the first layer's bias only
            model[0].bias.register_hook(lambda grad: grad * float("inf"))
        loss.backward()
        losses.append(float(loss.detach()))
        if hooks:
            assert all(p.grad is None for p in model.parameters())  # freed right after each step
            norms.append(hooks.finish())
        else:
            opt.step()
            opt.zero_grad()
    return losses, [p.detach().clone() for p in model.parameters()], norms, opt


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_same_losses_and_weights_bitwise(optimizer):
    plain, fused = _run(False, optimizer), _run(True, optimizer)
    assert plain[0] == fused[0]
    assert all(torch.equal(a, b) for a, b in zip(plain[1], fused[1]))
    assert 0 < fused[2][0] < float("inf")  # the measured gradient norm
    # the optimizer state has the normal layout (a checkpoint resumes either way)
    assert plain[3].state_dict()["param_groups"] == fused[3].state_dict()["param_groups"]


def test_stochastic_rounding_agrees_closely():
    plain, fused = _run(False, "adamw", sr=True), _run(True, "adamw", sr=True)
    assert plain[0][0] == fused[0][0]  # the first forward precedes any rounding
    assert max(abs(a - b) for a, b in zip(plain[0], fused[0])) < 1e-3


def test_a_nonfinite_gradient_skips_that_tensor():
    _, weights, norms, _ = _run(True, "adamw", poison=3)
    assert norms[3] != norms[3] and norms[2] == norms[2]  # nan: a gradient was not finite
    _, three, _, _ = _run(True, "adamw", steps=3)
    _, four, _, _ = _run(True, "adamw", steps=4)
    assert torch.equal(weights[1], three[1])  # the poisoned bias kept its weight
    assert torch.equal(weights[0], four[0]) and not torch.equal(weights[0], three[0])  # the others stepped


@pytest.mark.parametrize("sets, match", [(["grad_accum_steps=2", "batch_size=4"], "grad_accum_steps"),
                                         (["grad_clip=1.0"], "grad_clip"), (["optimizer=prodigy"], "optimizer")])
def test_refused_combinations(sets, match):
    from core.config import load_config
    from core.errors import UserError
    from train.train_c import StageCConfig

    base = ["checkpoint_path=/tmp/x", "output_path=/tmp/x", "fused_backward=true", "grad_clip=0"]
    with pytest.raises(UserError, match=match):
        load_config(StageCConfig, "configs/training/tiny_c.yaml", base + sets, validate_only=True)
    cfg = load_config(StageCConfig, "configs/training/tiny_c.yaml", base, validate_only=True)
    assert cfg.fused_backward

    from core.fused_backward import check_world

    with pytest.raises(UserError, match="one process"):
        check_world(cfg, 2)


def test_refused_under_a_multi_process_launcher(monkeypatch):
    from core.config import load_config
    from core.errors import UserError
    from train.train_c import StageCConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="one process"):
        load_config(StageCConfig, "configs/training/tiny_c.yaml", ["checkpoint_path=/tmp/x", "output_path=/tmp/x",
                    "fused_backward=true", "grad_clip=0"], validate_only=True)
