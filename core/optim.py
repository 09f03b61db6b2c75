"""Optimizer and learning-rate warmup (docs/OFFICIAL.md, Optimizer and warmup; the official defects fixed).

Defaults equal the reference (AdamW, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01, gradient
clipping at 1.0). Warmup and the lr schedule after it: ``core/lr_schedule.py`` (the first update already trains; the
reference started at lr 0 and wasted it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Optional, Union

import torch

from core.config import doc
from core.errors import UserError
from core.lr_schedule import LRSchedule, LRScheduleConfig, PlannedLR, build_lr_scheduler

__all__ = ["OptimConfig", "ParamGroups", "build_optimizer", "build_warmup_scheduler", "build_lr_scheduler",
           "OptimizerState"]

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


@dataclass
class OptimConfig(LRScheduleConfig):
    """Optimizer keys (ours; the reference hard-coded AdamW with PyTorch defaults), with the lr schedule's."""

    optimizer: Literal["adamw", "adamw_fused", "adafactor", "adamw8bit", "prodigy"] = doc("adamw", "adamw (reference), adamw_fused (fused kernel), adafactor (torch.optim.Adafactor, low memory), adamw8bit (needs bitsandbytes on CUDA), prodigy (prodigyopt.Prodigy: estimates the step size itself, use lr: 1.0; popular for LoRAs because no lr search is needed).")
    betas: tuple[float, float] = doc((0.9, 0.999), "Adam betas (not used by adafactor).")
    eps: float = doc(1e-8, "Adam epsilon.")
    weight_decay: float = doc(0.01, "Decoupled weight decay (reference: 0.01).")
    grad_clip: Optional[float] = doc(1.0, "Clip the global gradient norm to this value before each update (None or 0 = no clipping).")
    stochastic_rounding: bool = doc(False, "bf16 master-free training: with dtype: bfloat16, update each bf16 weight in float32 and round it back stochastically (optimizer states in float32). Default: fp32 master weights (dtype unset) under bf16 autocast.")

    def validate_optim(self) -> None:
        """Range checks of the optimizer keys."""
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"config key 'betas' must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise UserError(f"config key 'eps' must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise UserError(f"config key 'weight_decay' must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise UserError(f"config key 'grad_clip' must be >= 0 (0 or null disables clipping), got {self.grad_clip}")
        if self.optimizer == "prodigy" and getattr(self, "use_fsdp", False):
            # Its d estimate sums over whole parameters; over FSDP shards that needs prodigyopt's own
            # collective mode, which is not wired or tested here.
            raise UserError("optimizer 'prodigy' does not combine with use_fsdp: true (untested over sharded "
                            "parameters); use DDP (use_fsdp: false) or optimizer: adamw")


def _trainable(params: ParamsT) -> list:
    """Keep only parameters that require grad (groups keep their options)."""
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = []
        for group in items:
            kept = [p for p in group["params"] if p.requires_grad]
            if kept:
                groups.append({**group, "params": kept})
        return groups
    return [p for p in items if p.requires_grad]


class ParamGroups:
    """The hook through which a job gives some trainable parameters their own optimizer options
    (e.g. LoRA+'s larger ``lr`` for adapter up factors); ``TrainingCore`` builds its optimizer from
    :meth:`optimizer_param_groups` of its trainable parameters (after wrapping, so the parameters are
    the ones the optimizer steps)."""

    def optimizer_param_groups(self, params: list) -> list:
        """The optimizer's parameter groups (a list of tensors or of group dicts); default: one group."""
        return params


def build_optimizer(params: ParamsT, lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable ``params`` (tensors or param groups);
    with ``stochastic_rounding`` its bf16 parameters are stepped in float32 and rounded back
    stochastically (core/stochastic_rounding.py)."""
    opt = _build_optimizer(params, lr, cfg)
    if getattr(cfg, "stochastic_rounding", False):
        if cfg.optimizer == "adamw8bit":
            raise UserError("config key 'stochastic_rounding' does not combine with optimizer 'adamw8bit' "
                            "(bitsandbytes keeps its own states); use adamw or adafactor")
        from core.stochastic_rounding import enable_stochastic_rounding

        enable_stochastic_rounding(opt)
    return opt


def _build_optimizer(params: ParamsT, lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = _trainable(params)
    if not params:
        raise ValueError("build_optimizer: no trainable parameters (is everything frozen?)")
    betas = tuple(float(b) for b in cfg.betas)
    if cfg.optimizer in ("adamw", "adamw_fused"):
        fused = True if cfg.optimizer == "adamw_fused" else None
        # Stochastic rounding steps one tensor at a time; the fused/foreach kernels gain nothing there.
        foreach = False if getattr(cfg, "stochastic_rounding", False) else None
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 fused=fused, foreach=None if fused else foreach)
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise UserError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                            "(CUDA only), or set optimizer: adamw") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy  # type: ignore[import-not-found]
        except ImportError:
            raise UserError("optimizer 'prodigy' needs prodigyopt: pip install prodigyopt "
                            "(in requirements.txt), or set optimizer: adamw") from None
        # Prodigy's d estimate multiplies lr, so lr is a factor on the estimate (1.0 = as estimated);
        # bias correction and the warmup safeguard are what its authors advise for diffusion models.
        return Prodigy(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       use_bias_correction=True, safeguard_warmup=True)
    raise UserError(f"unknown optimizer '{cfg.optimizer}'")


def build_warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup and constant lr afterwards (``core.lr_schedule``, schedule ``constant``); call
    ``step()`` after each update and save/restore with ``state_dict()`` / ``load_state_dict()``."""
    return PlannedLR(optimizer, LRSchedule("constant", warmup_updates, updates=1))


class OptimizerState:
    """The optimizer as a checkpoint state object: keyed by parameter name and gathered under
    FSDP (portable across world sizes), the plain ``state_dict`` otherwise (main rank only)."""

    def __init__(self, optimizer: torch.optim.Optimizer, modules: Callable[[], list], fsdp: bool,
                 is_main: bool, where: str) -> None:
        self.optimizer, self.modules, self.fsdp, self.is_main, self.where = optimizer, modules, fsdp, is_main, where

    def state_dict(self) -> Any:
        from core.distributed import full_optimizer_state_dict

        if self.fsdp:
            return full_optimizer_state_dict(self.modules(), self.optimizer)  # collective
        return self.optimizer.state_dict() if self.is_main else None

    def load_state_dict(self, state: Any) -> None:
        from core.distributed import load_full_optimizer_state_dict

        groups = state.get("param_groups") or [{}]
        by_name = bool(groups[0].get("params")) and isinstance(groups[0]["params"][0], str)
        if by_name != self.fsdp:
            saved, now = ("FSDP", "without FSDP") if by_name else ("without FSDP", "with FSDP")
            raise UserError(f"the checkpoint in {self.where} was trained {saved} and this run is {now}; "
                            f"resume with the same use_fsdp setting (and >1 process for FSDP)")
        if by_name:
            load_full_optimizer_state_dict(self.modules(), self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)
