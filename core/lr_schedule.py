"""Learning-rate schedules: warmup, then constant / linear / cosine / cosine with restarts / polynomial decay.

The factor of update ``n`` (0-based; the lr the n-th optimizer step uses is ``lr * factor(n)``):

* warmup: ``min(1, (n + 1) / warmup_updates)`` for ``n < warmup_updates`` (the first update
  already trains, as before this module existed);
* after warmup, ``p = (n - d0) / (updates - 1 - d0)`` clamped to [0, 1], with ``d0 =
  max(warmup_updates, 1) - 1`` the first update at full lr, so the LAST update uses exactly
  ``lr * lr_final_ratio`` (``r``):

  - constant: ``1``
  - linear: ``r + (1 - r) * (1 - p)``
  - cosine: ``r + (1 - r) * (1 + cos(pi * p)) / 2``
  - cosine_with_restarts: cosine of ``q = frac(p * lr_cycles)`` (``q = 1`` at ``p = 1``): the lr
    jumps back to full at the start of each of the ``lr_cycles`` cycles;
  - polynomial: ``r + (1 - r) * (1 - p) ** lr_power`` (power 1 = linear).

The schedule is a pure function of the update count and these keys, so a resume continues it
exactly: the scheduler's state is the update count (and the base lrs). A resume whose schedule keys
differ from the checkpoint's follows the new keys from the saved update on, with a warning that
says so (the lr then jumps).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from core.config import doc
from core.errors import UserError

__all__ = ["LRScheduleConfig", "LRSchedule", "PlannedLR", "build_lr_scheduler", "plot_lr_schedule", "SCHEDULES"]

log = logging.getLogger("cascade.train")

SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class LRScheduleConfig:
    """Keys of the learning-rate schedule (warmup length: ``warmup_updates``, a run key)."""

    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"] = doc(
        "constant", "Learning-rate schedule after the linear warmup (warmup_updates): constant; linear, cosine or "
                    "polynomial decay to lr * lr_final_ratio at the last update; cosine_with_restarts (lr_cycles "
                    "cosine cycles, each restarting at full lr). Formulas in core/lr_schedule.py; the planned curve is "
                    "written to <run>/lr_schedule.png and printed by --dry-run.")
    lr_final_ratio: float = doc(0.0, "lr of the last update as a fraction of lr, in [0, 1] (decaying schedules; "
                                     "also the floor of each restart cycle). Unused by constant.")
    lr_cycles: int = doc(1, "Number of cosine cycles of cosine_with_restarts (>= 1; 1 = plain cosine).")
    lr_power: float = doc(1.0, "Exponent of the polynomial decay (> 0; 1 = linear, 2 = quadratic).")

    def validate_lr_schedule(self) -> None:
        if not 0.0 <= self.lr_final_ratio <= 1.0:
            raise UserError(f"config key 'lr_final_ratio' must be in [0, 1], got {self.lr_final_ratio}")
        if self.lr_cycles < 1:
            raise UserError(f"config key 'lr_cycles' must be >= 1, got {self.lr_cycles}")
        if not self.lr_power > 0:
            raise UserError(f"config key 'lr_power' must be > 0, got {self.lr_power}")
        if self.lr_cycles != 1 and self.lr_scheduler != "cosine_with_restarts":
            raise UserError(f"config key 'lr_cycles' applies to lr_scheduler: cosine_with_restarts only (got "
                            f"lr_scheduler: {self.lr_scheduler}); remove it or change lr_scheduler")
        if self.lr_power != 1.0 and self.lr_scheduler != "polynomial":
            raise UserError(f"config key 'lr_power' applies to lr_scheduler: polynomial only (got lr_scheduler: "
                            f"{self.lr_scheduler}); remove it or change lr_scheduler")


class LRSchedule:
    """``factor(n)``: the lr multiplier of update ``n`` (0-based). A class, not a lambda, so it
    pickles and compares (``plan()``)."""

    def __init__(self, kind: str, warmup_updates: int, updates: int, final_ratio: float = 0.0,
                 cycles: int = 1, power: float = 1.0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
        self.kind, self.warmup, self.updates = kind, int(warmup_updates), int(updates)
        self.final_ratio, self.cycles, self.power = float(final_ratio), int(cycles), float(power)

    @classmethod
    def from_config(cls, cfg: Any) -> "LRSchedule":
        return cls(getattr(cfg, "lr_scheduler", "constant"), cfg.warmup_updates, cfg.updates,
                   getattr(cfg, "lr_final_ratio", 0.0), getattr(cfg, "lr_cycles", 1), getattr(cfg, "lr_power", 1.0))

    def plan(self) -> dict[str, Any]:
        """The keys that define the curve (saved with the scheduler's state)."""
        return {"kind": self.kind, "warmup_updates": self.warmup, "updates": self.updates,
                "final_ratio": self.final_ratio, "cycles": self.cycles, "power": self.power}

    def progress(self, n: int) -> float:
        """``p`` in [0, 1]: 0 at the first full-lr update, 1 at the last update."""
        d0 = max(self.warmup, 1) - 1
        span = self.updates - 1 - d0
        if span <= 0:
            return 1.0 if n > d0 else 0.0
        return min(1.0, max(0.0, (n - d0) / span))

    def __call__(self, n: int) -> float:
        if self.warmup > 0 and n < self.warmup:
            return min(1.0, (n + 1) / self.warmup)
        if self.kind == "constant":
            return 1.0
        p, r = self.progress(n), self.final_ratio
        if self.kind == "linear":
            shape = 1.0 - p
        elif self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * p))
        elif self.kind == "cosine_with_restarts":
            q = 1.0 if p >= 1.0 else (p * self.cycles) % 1.0
            shape = 0.5 * (1.0 + math.cos(math.pi * q))
        else:  # polynomial
            shape = (1.0 - p) ** self.power
        return r + (1.0 - r) * shape


class PlannedLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over one :class:`LRSchedule` whose saved state is the update count, the base lrs
    and the plan (not the callable: the config's plan is what a resume follows)."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> None:
        self.schedule = schedule
        super().__init__(optimizer, schedule)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs), "plan": self.schedule.plan()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Also reads the state of the warmup-only LambdaLR of earlier versions (its lr_lambdas are ignored).
        if not isinstance(state, dict) or "last_epoch" not in state:
            raise UserError("scheduler.pt: not a learning-rate scheduler state")
        saved: Optional[dict] = state.get("plan")
        if saved is not None and saved != self.schedule.plan():
            changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in self.schedule.plan().items() if saved.get(k) != v)
            log.warning("the lr schedule differs from the checkpoint's (%s): from update %d on it follows the config",
                        changed, int(state["last_epoch"]))
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = [float(x) for x in state.get("base_lrs", self.base_lrs)]
        factor = self.schedule(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, plot: Optional[Any] = None) -> PlannedLR:
    """The configured schedule on ``optimizer``; ``step()`` after each update. ``plot``: also write
    the planned curve there (:func:`plot_lr_schedule`)."""
    if plot is not None:
        plot_lr_schedule(cfg, str(plot))
    return PlannedLR(optimizer, LRSchedule.from_config(cfg))


def schedule_lines(cfg: Any, points: int = 6) -> list[str]:
    """Dry-run lines: the lr at a few updates of the plan."""
    s = LRSchedule.from_config(cfg)
    picks = sorted({0, max(s.warmup - 1, 0)} | {round(i * (s.updates - 1) / (points - 1)) for i in range(points)})
    values = ", ".join(f"{n + 1}: {cfg.lr * s(n):.3g}" for n in picks if 0 <= n < s.updates)
    return [f"# lr schedule: {s.kind}, warmup {s.warmup}, final ratio {s.final_ratio:g}"
            + (f", {s.cycles} cycles" if s.kind == "cosine_with_restarts" else "")
            + (f", power {s.power:g}" if s.kind == "polynomial" else ""), f"lr at update {values}"]


def plot_lr_schedule(cfg: Any, path: str) -> None:
    """Write the planned lr over every update as a PNG (Agg figure, no pyplot state)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fileio.atomic import atomic_write_bytes

    s = LRSchedule.from_config(cfg)
    stride = max(1, s.updates // 2000)  # at most ~2000 points (every restart/warmup edge stays visible enough)
    xs = list(range(0, s.updates, stride)) + [s.updates - 1]
    fig = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([n + 1 for n in xs], [cfg.lr * s(n) for n in xs])
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{s.kind} (warmup {s.warmup})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
