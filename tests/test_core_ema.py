"""core.ema: the official update rule in optimizer updates, validation, state round trip."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from core.config import RunConfig, load_config
from core.ema import EMA, EMAConfig
from core.errors import UserError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def set_all(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.scale.fill_(value)
        model.count.fill_(int(value))


def test_rule_counts_updates_and_blends():
    torch.manual_seed(0)
    model = Net()
    ema = EMA(model, EMAConfig(ema_start_iters=4, ema_iters=2, ema_beta=0.9))
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    set_all(model, 1.0)
    assert ema.update(1) is False  # not a multiple of ema_iters: untouched
    assert not torch.equal(ema.module.lin.weight, model.lin.weight)
    assert ema.update(4) is True  # 4 is not > ema_start_iters: beta 0, a plain copy
    assert torch.equal(ema.module.lin.weight, model.lin.weight)
    set_all(model, 3.0)
    ema.update(6)  # beta 0.9: 1*0.9 + 3*0.1
    assert torch.allclose(ema.module.lin.weight, torch.full((2, 3), 1.2))
    assert torch.equal(ema.module.scale, torch.full((2,), 3.0))  # buffers are copied, not averaged
    assert int(ema.module.count) == 3 and ema.last_update == 6


def test_average_buffers_option_and_state_roundtrip():
    model = Net()
    set_all(model, 1.0)
    ema = EMA(model, EMAConfig(ema_start_iters=0, ema_iters=1, ema_beta=0.5), average_buffers=True)
    set_all(model, 3.0)
    ema.update(1)
    assert torch.allclose(ema.module.scale, torch.full((2,), 2.0)) and int(ema.module.count) == 3
    other = EMA(Net(), EMAConfig(ema_start_iters=0, ema_iters=1, ema_beta=0.5))
    other.load_state_dict(ema.state_dict())
    assert set(ema.state_dict()) == {"lin.weight", "lin.bias", "scale", "count"}
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ema.state_dict().values()))


@dataclass
class C(RunConfig, EMAConfig):
    pass


@pytest.mark.parametrize("data, message", [
    ({"ema_start_iters": 10}, "'ema_iters' and 'ema_beta' are required"),
    ({"ema_start_iters": 10, "ema_iters": 0, "ema_beta": 0.9}, "'ema_iters' must be >= 1"),
    ({"ema_start_iters": 10, "ema_iters": 5, "ema_beta": 1.0}, r"'ema_beta' must be in \[0, 1\)"),
    ({"ema_start_iters": -1, "ema_iters": 5, "ema_beta": 0.5}, "'ema_start_iters' must be >= 0"),
])
def test_validation(data, message):
    with pytest.raises(UserError, match=message):
        load_config(C, None, [f"{k}={v}" for k, v in data.items()], extra={"training": False})


def test_readme_example_validates():
    cfg = load_config(C, None, ["ema_start_iters=5000", "ema_iters=100", "ema_beta=0.9"],
                      extra={"training": False})
    assert cfg.ema_enabled and cfg.ema_beta == 0.9
