"""Exponential moving average of the trained network (docs/OFFICIAL.md, EMA), counted in updates.

Rule: after optimizer update ``step`` with ``step % ema_iters == 0``:
``beta = ema_beta if step > ema_start_iters else 0`` and ``ema <- ema * beta + model * (1 - beta)``
for every parameter (beta 0 = a plain copy). Deviations from the reference (documented):
``step`` counts OPTIMIZER UPDATES, not micro-iterations (so grad_accum_steps does not change the EMA
horizon), and buffers are COPIED from the model instead of averaged (``average_buffers=True`` restores
the reference behaviour for floating buffers; integer buffers are always copied).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from core.config import doc
from core.distributed import full_tensor, is_sharded
from core.errors import UserError

__all__ = ["EMAConfig", "EMA"]

log = logging.getLogger(__name__)


@dataclass
class EMAConfig:
    """EMA keys (official names); EMA is enabled when ``ema_start_iters`` is set."""

    ema_start_iters: Optional[int] = doc(None, "Enable the EMA model; EMA blending (ema_beta) starts after this many optimizer updates (before: plain copies).")
    ema_iters: Optional[int] = doc(None, "EMA update period in optimizer updates (required with ema_start_iters).")
    ema_beta: Optional[float] = doc(None, "EMA decay, 0 <= ema_beta < 1 (required with ema_start_iters).")

    @property
    def ema_enabled(self) -> bool:
        """Whether an EMA model is kept."""
        return self.ema_start_iters is not None

    def validate_ema(self) -> None:
        """ema_iters/ema_beta are required and range-checked when ema_start_iters is set."""
        if self.ema_start_iters is None:
            if self.ema_iters is not None or self.ema_beta is not None:
                log.warning("ema_iters/ema_beta are set but ema_start_iters is not: no EMA model is kept")
            return
        if self.ema_start_iters < 0:
            raise UserError(f"config key 'ema_start_iters' must be >= 0, got {self.ema_start_iters}")
        if self.ema_iters is None or self.ema_beta is None:
            raise UserError("config keys 'ema_iters' and 'ema_beta' are required when 'ema_start_iters' is set "
                            "(e.g. ema_iters: 100, ema_beta: 0.9)")
        if self.ema_iters < 1:
            raise UserError(f"config key 'ema_iters' must be >= 1, got {self.ema_iters}")
        if not 0.0 <= self.ema_beta < 1.0:
            raise UserError(f"config key 'ema_beta' must be in [0, 1), got {self.ema_beta}")


class EMA:
    """A frozen eval-mode deep copy of ``model`` updated by the official rule (see module doc).

    Create it from the UNWRAPPED model before DDP/FSDP wrapping (``update`` accepts the wrapped
    parameters later: DDP shares them, FSDP2 DTensors are gathered). ``.module`` is the EMA network
    (official key layout, so ``.state_dict()`` saves as ``generator_ema.safetensors``)."""

    def __init__(self, model: nn.Module, cfg: EMAConfig, average_buffers: bool = False) -> None:
        if cfg.ema_start_iters is None or cfg.ema_iters is None or cfg.ema_beta is None:
            raise ValueError("EMA needs ema_start_iters, ema_iters and ema_beta (see EMAConfig.validate_ema)")
        if is_sharded(model):
            raise ValueError("create the EMA from the model BEFORE fully_shard wraps it")
        self.model = model
        self.cfg = cfg
        self.average_buffers = average_buffers
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.last_update: Optional[int] = None

    def beta(self, step: int) -> float:
        """The decay used at ``step`` (0 until ``ema_start_iters`` updates have passed)."""
        return float(self.cfg.ema_beta) if step > int(self.cfg.ema_start_iters) else 0.0

    def due(self, step: int) -> bool:
        """Whether update ``step`` is an EMA step."""
        return step % int(self.cfg.ema_iters) == 0

    @torch.no_grad()
    def update(self, step: int, model: Optional[nn.Module] = None) -> bool:
        """Apply the rule after optimizer update ``step`` (1-based). ``model`` defaults to the
        model given at construction. Returns whether an update happened."""
        if not self.due(step):
            return False
        source = self.model if model is None else model
        beta = self.beta(step)
        src_params = list(source.parameters())
        ema_params = list(self.module.parameters())
        if len(src_params) != len(ema_params):
            raise RuntimeError("EMA and model have different parameter lists")
        for ema_p, p in zip(ema_params, src_params):
            # collective for FSDP2 DTensors: every rank updates at the same steps
            value = full_tensor(p.detach()).to(device=ema_p.device, dtype=ema_p.dtype)
            if beta == 0.0:
                ema_p.copy_(value)
            else:
                ema_p.lerp_(value, 1.0 - beta)  # ema*beta + value*(1-beta)
        for ema_b, b in zip(self.module.buffers(), source.buffers()):
            value = full_tensor(b.detach()).to(device=ema_b.device)
            if self.average_buffers and ema_b.is_floating_point() and beta != 0.0:
                ema_b.lerp_(value.to(ema_b.dtype), 1.0 - beta)
            else:
                ema_b.copy_(value)
        self.last_update = step
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA network's weights (official key layout)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load EMA weights saved by ``state_dict`` (e.g. from generator_ema.safetensors)."""
        self.module.load_state_dict(state_dict, strict=strict)
