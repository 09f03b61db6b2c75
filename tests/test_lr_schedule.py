"""lr_scheduler: values at chosen updates against the formulas, exact resume, validation, plot."""
import math

import pytest
import torch
from torch import nn

from core.errors import UserError
from core.lr_schedule import LRSchedule, LRScheduleConfig, PlannedLR, plot_lr_schedule, schedule_lines


def run(schedule: LRSchedule, n: int, lr: float = 1.0) -> list[float]:
    """The lr each of the first ``n`` updates uses."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = PlannedLR(opt, schedule)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_formulas_at_chosen_updates():
    N, W, r = 11, 3, 0.1  # updates 0..10; d0 = 2 (first full-lr update), span 8
    lin = run(LRSchedule("linear", W, N, r), N)
    assert lin[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lin[6] == pytest.approx(r + (1 - r) * (1 - 4 / 8))
    assert lin[10] == pytest.approx(r)
    cos = run(LRSchedule("cosine", W, N, r), N)
    assert cos[4] == pytest.approx(r + (1 - r) * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert cos[10] == pytest.approx(r)
    poly = run(LRSchedule("polynomial", W, N, r, power=2.0), N)
    assert poly[6] == pytest.approx(r + (1 - r) * 0.5 ** 2)
    restarts = run(LRSchedule("cosine_with_restarts", 1, 9, 0.0, cycles=2), 9)  # d0 0, span 8: cycles of 4
    assert restarts[0] == restarts[4] == pytest.approx(1.0)  # each cycle starts at full lr
    assert restarts[2] == pytest.approx(0.5) and restarts[6] == pytest.approx(0.5)
    assert restarts[8] == pytest.approx(0.0)
    assert run(LRSchedule("constant", 4, 6), 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind", ["linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_resume_is_exact(kind, tmp_path):
    s = LRSchedule(kind, 2, 12, 0.05, cycles=3 if kind == "cosine_with_restarts" else 1,
                   power=1.5 if kind == "polynomial" else 1.0)
    straight = run(s, 12, lr=0.3)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = PlannedLR(opt, s)
    for _ in range(5):
        opt.step(); sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.3)
    sched2 = PlannedLR(opt2, LRSchedule(kind, 2, 12, 0.05, cycles=s.cycles, power=s.power))
    sched2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    resumed = []
    for _ in range(7):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step(); sched2.step()
    assert resumed == straight[5:]  # bit-exact


def test_old_warmup_state_loads():
    """scheduler.pt of the warmup-only LambdaLR of earlier versions."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    old = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: min(1.0, (n + 1) / 4))
    for _ in range(2):
        opt.step(); old.step()
    state = old.state_dict()
    state.pop("lr_lambdas")
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = PlannedLR(opt2, LRSchedule("constant", 4, 10))
    sched.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == 0.75


def cfg(**kw):
    from dataclasses import dataclass

    from core.config import RunConfig

    @dataclass
    class C(RunConfig, LRScheduleConfig):
        pass

    base = dict(experiment_id="x", checkpoint_path="c", output_path="o", lr=1e-3,
                batch_size=1, updates=20, save_every=10, warmup_updates=5)
    return C(**{**base, **kw})


@pytest.mark.parametrize("kw, message", [
    ({"lr_final_ratio": 1.5}, "'lr_final_ratio' must be in \\[0, 1\\]"),
    ({"lr_scheduler": "cosine_with_restarts", "lr_cycles": 0}, "'lr_cycles' must be >= 1"),
    ({"lr_scheduler": "cosine", "lr_cycles": 3}, "'lr_cycles' applies to lr_scheduler: cosine_with_restarts"),
    ({"lr_scheduler": "polynomial", "lr_power": 0.0}, "'lr_power' must be > 0"),
    ({"lr_scheduler": "linear", "lr_power": 2.0}, "'lr_power' applies to lr_scheduler: polynomial"),
])
def test_validation_errors(kw, message):
    with pytest.raises(UserError, match=message):
        cfg(**kw).validate_lr_schedule()


def test_config_rejects_unknown_schedule(tmp_path):
    from core.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("lr_scheduler: cosine_annealing\n")
    with pytest.raises(UserError, match="'lr_scheduler' expects one of 'constant'"):
        load_config(type(cfg()), str(path), extra=dict(experiment_id="x", checkpoint_path="c", output_path="o",
                                                       lr=1e-3, batch_size=1, updates=2,
                                                       save_every=1))


def test_plot_and_dry_run_lines(tmp_path):
    c = cfg(lr_scheduler="cosine", lr_final_ratio=0.1)
    plot_lr_schedule(c, str(tmp_path / "lr.png"))
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    lines = schedule_lines(c)
    assert "cosine" in lines[0] and "20: 0.0001" in lines[1]
