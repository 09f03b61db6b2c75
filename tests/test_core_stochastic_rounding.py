"""bf16 master-free training with stochastic rounding (core/stochastic_rounding.py, core/optim.py)."""
import pytest
import torch

from core.optim import OptimConfig, build_optimizer, build_warmup_scheduler
from core.stochastic_rounding import stochastic_round_to_bf16


def test_rounding_is_unbiased_and_lands_on_neighbours():
    value = 1.0 + 2.0 ** -10  # between the bf16 neighbours 1.0 and 1.0 + 2**-7
    x = torch.full((200_000,), value, dtype=torch.float32)
    r = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert abs(r.mean().item() - value) < 2e-5
    exact = torch.tensor([0.5, -3.0, float("inf")], dtype=torch.float32)
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)


def test_bf16_weights_keep_learning_small_updates():
    """Updates far below bf16 resolution vanish with plain bf16 steps but not with stochastic rounding."""
    torch.manual_seed(0)
    results = {}
    for sr in (False, True):
        w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        cfg = OptimConfig(optimizer="adamw", weight_decay=0.0, stochastic_rounding=sr)
        opt = build_optimizer([w], lr=1e-4, cfg=cfg)
        sched = build_warmup_scheduler(opt, 1)
        for _ in range(20):
            w.grad = torch.ones_like(w)
            opt.step()
            sched.step()
        assert w.dtype == torch.bfloat16
        results[sr] = w.float().mean().item()
    assert results[False] == 1.0  # 1e-4 steps are below bf16's 2**-8 spacing at 1.0: lost
    assert results[True] == pytest.approx(1.0 - 20 * 1e-4, abs=3e-4)
    # optimizer state is float32 even though the weight is bf16
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == torch.float32


def test_mixed_dtypes_and_state_dict_round_trip():
    a = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(8))
    opt = build_optimizer([a, b], lr=1e-2, cfg=OptimConfig(stochastic_rounding=True))
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
    sd = opt.state_dict()
    assert len(sd["state"]) == 2 and len(opt.param_groups[0]["params"]) == 2
