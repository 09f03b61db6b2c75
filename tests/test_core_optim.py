"""core.optim: optimizer choices, warmup fixed to start at a non-zero lr, resumable schedule."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from core.config import RunConfig, load_config
from core.errors import UserError
from core.optim import OptimConfig, build_optimizer, build_warmup_scheduler


def test_defaults_match_reference():
    model = nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    opt = build_optimizer(model.parameters(), 1e-4, OptimConfig())
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and len(group["params"]) == 1  # frozen bias left out
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0.01
    assert isinstance(build_optimizer(model.parameters(), 1e-3, OptimConfig(optimizer="adafactor")),
                      torch.optim.Adafactor)


def test_adamw8bit_without_bitsandbytes_is_a_user_error():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        build_optimizer(nn.Linear(2, 2).parameters(), 1e-3, OptimConfig(optimizer="adamw8bit"))


def lrs(warmup: int, n: int) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], 1.0, OptimConfig())
    sched = build_warmup_scheduler(opt, warmup)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])  # the lr the next update uses
        opt.step()
        sched.step()
    return out


def test_warmup_starts_non_zero_and_stays_constant():
    assert lrs(1, 3) == [1.0, 1.0, 1.0]  # shipped configs: the first update already trains
    assert lrs(4, 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lrs(0, 2) == [1.0, 1.0]


def test_scheduler_resume_continues_the_ramp(tmp_path):
    p = nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], 1.0, OptimConfig())
    sched = build_warmup_scheduler(opt, 4)
    for _ in range(2):
        opt.step(); sched.step()
    torch.save({"o": opt.state_dict(), "s": sched.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=False)
    p2 = nn.Parameter(torch.zeros(1))
    opt2 = build_optimizer([p2], 1.0, OptimConfig())
    sched2 = build_warmup_scheduler(opt2, 4)
    opt2.load_state_dict(state["o"]); sched2.load_state_dict(state["s"])
    assert opt2.param_groups[0]["lr"] == 0.75
    opt2.step(); sched2.step()
    assert opt2.param_groups[0]["lr"] == 1.0


@dataclass
class C(RunConfig, OptimConfig):
    pass


@pytest.mark.parametrize("override, message", [
    ("betas=[0.9, 1.5]", "'betas' must be two numbers"),
    ("betas=[0.9]", "'betas' expects tuple"),
    ("eps=0", "'eps' must be > 0"),
    ("weight_decay=-1", "'weight_decay' must be >= 0"),
    ("grad_clip=-1", "'grad_clip' must be >= 0"),
    ("optimizer=sgd", "'optimizer' expects one of"),
])
def test_validation(override, message):
    with pytest.raises(UserError, match=message):
        load_config(C, None, [override], extra={"training": False})
    cfg = load_config(C, None, ["betas=[0.9, 0.95]", "grad_clip=null"], extra={"training": False})
    assert cfg.betas == (0.9, 0.95) and cfg.grad_clip is None
