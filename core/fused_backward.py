"""Fused backward pass (``fused_backward: true``): each parameter's optimizer step runs as soon as its
gradient is complete, inside backward, and the gradient is freed right after.

Why: a full finetune otherwise holds every gradient at once (3.6B in bf16: 6.7 GiB) until the
optimizer step, plus the step's ``foreach`` temporaries. Here at most a few gradients are alive
at any time, so the step costs about one tensor's gradient and temporaries.

How: a ``Tensor.register_post_accumulate_grad_hook`` per trained parameter calls the run's own
optimizer (the one ``core.optim.build_optimizer`` built, so its state, its ``state_dict`` layout,
the LR scheduler and stochastic rounding are those of the normal run) with its parameter groups
narrowed to that one parameter, then sets ``p.grad = None``. The optimizer's math is per tensor
for AdamW, Adafactor and AdamW + stochastic rounding, so the updates equal the normal ones
(bitwise on the CPU, where both take the single-tensor path; the stochastic rounding draws its
noise in another order, so there the runs agree in distribution, not bitwise). Optimizer-state
dtypes are those of the normal run: like the parameter (float32 master weights: float32 moments;
``dtype: bfloat16`` without stochastic rounding: bf16 moments, the memory-saving point of that
setting), float32 with stochastic rounding (the step runs on a float32 copy).

What it cannot combine with (refused by :meth:`FusedBackwardConfig.validate_fused_backward` and at
setup): gradient accumulation (a step would run per micro-step), global-norm clipping (the norm is
known only after the last gradient, when the other tensors are already stepped; set
``grad_clip: 0`` to only measure it), several processes (DDP/FSDP reduce gradients after the
hooks would have stepped), optimizers that are not per tensor (adamw8bit, prodigy's global d
estimate).

The non-finite guard: a non-finite LOSS still skips the whole update exactly as without fusion
(backward never runs). A non-finite GRADIENT with a finite loss is found per tensor, in its hook:
that tensor is not stepped and the update counts as skipped, but tensors whose gradients were
finite have already been stepped (the update is partial, logged). The global gradient norm is
still measured (summed in the hooks, one sync after backward) and logged as ``grad_norm``.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from core.config import doc
from core.errors import UserError

__all__ = ["FusedBackwardConfig", "FusedBackward", "FUSED_OPTIMIZERS"]

log = logging.getLogger(__name__)

#: optimizers whose step is per tensor (what a per-parameter step needs)
FUSED_OPTIMIZERS = ("adamw", "adamw_fused", "adafactor")


@dataclass
class FusedBackwardConfig:
    """Keys of the fused backward pass (this module)."""

    fused_backward: bool = doc(
        False, "Run each parameter's optimizer step inside backward as soon as its gradient is complete and free the "
               "gradient (no full gradient buffer: saves the gradients' and the step temporaries' memory of a full "
               "finetune). adamw, adamw_fused, adafactor, with or without stochastic_rounding. Needs grad_accum_steps: "
               "1, grad_clip: 0 (the norm is still measured) and one process. A non-finite gradient (finite loss) "
               "skips only the tensors it hit (see core/fused_backward.py).")

    def validate_fused_backward(self) -> None:
        if not self.fused_backward:
            return
        accum = getattr(self, "grad_accum_steps", 1)
        if accum != 1:
            raise UserError(f"config key 'fused_backward: true' needs grad_accum_steps: 1 (got {accum}): the step runs "
                            f"inside each backward, so gradients cannot accumulate over micro-steps")
        max_norm = getattr(self, "grad_clip", None)
        if max_norm:
            raise UserError(f"config key 'fused_backward: true' does not combine with grad_clip: {max_norm} (global-norm "
                            f"clipping needs every gradient before the first step); set grad_clip: 0 (the norm is "
                            f"still logged) or fused_backward: false")
        from core.distributed import world_size_from_env

        check_world(self, world_size_from_env())  # the launcher's world size, before any model loads
        optimizer = getattr(self, "optimizer", "adamw")
        if optimizer not in FUSED_OPTIMIZERS:
            raise UserError(f"config key 'fused_backward: true' supports optimizer {', '.join(FUSED_OPTIMIZERS)} (per-"
                            f"tensor steps), got {optimizer!r}")


class FusedBackward:
    """Steps ``optimizer`` per parameter from post-accumulate-grad hooks on ``params``.

    After each backward :meth:`finish` returns the gradient norm (nan when a gradient was not
    finite) and starts the next update. ``optimizer.step()`` is a no-op while the hooks are
    attached (:meth:`remove` drops them)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        missing = [p for p in params if id(p) not in self.group_of]
        if missing:
            raise ValueError(f"FusedBackward: {len(missing)} trained parameters are not in the optimizer")
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        # The loop's own optimizer.step() becomes a no-op (every parameter was stepped in backward);
        # the hooks call the real one.
        self.real_step = optimizer.step
        optimizer.step = types.MethodType(lambda _self, closure=None: None, optimizer)  # type: ignore[method-assign]
        self.begin()

    @classmethod
    def for_run(cls, cfg: Any, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
                world_size: int) -> Optional["FusedBackward"]:
        """The hooks of a run with ``cfg.fused_backward`` on ``world_size`` processes (refused on
        several: :func:`check_world`), None without it. Build it before an LR scheduler wraps
        ``optimizer.step`` (the no-op the loop then calls is what the scheduler wraps)."""
        if not getattr(cfg, "fused_backward", False):
            return None
        check_world(cfg, world_size)
        return cls(optimizer, params)

    def begin(self) -> None:
        """Forget the previous backward's norm and non-finite tensors."""
        self.norm_sq: Optional[torch.Tensor] = None
        self.bad: list[int] = []
        self.stepped = 0

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        sq = grad.detach().float().pow(2).sum()
        self.norm_sq = sq if self.norm_sq is None else self.norm_sq + sq
        # A sync per tensor: the price of not stepping a broken gradient (a simulation's fake
        # tensors have no values: taken as finite).
        if not is_fake(sq) and not bool(torch.isfinite(sq)):
            self.bad.append(id(p))
        else:
            self._step_one(p)
            self.stepped += 1
        p.grad = None

    def _step_one(self, p: torch.Tensor) -> None:
        groups = self.optimizer.param_groups
        saved = [g["params"] for g in groups]
        try:
            for g in groups:
                g["params"] = []
            groups[self.group_of[id(p)]]["params"] = [p]
            self.real_step()
        finally:
            for g, ps in zip(groups, saved):
                g["params"] = ps

    def finish(self) -> float:
        """The global gradient norm of the backward that just ran, nan when a gradient was not
        finite (its tensor was not stepped); then :meth:`begin`."""
        norm = 0.0 if self.norm_sq is None or is_fake(self.norm_sq) else float(self.norm_sq.sqrt())
        if self.bad:
            log.warning("fused backward: %d tensor(s) had a non-finite gradient and were not stepped; %d tensor(s) "
                        "were already stepped (partial update)", len(self.bad), self.stepped)
            norm = float("nan")
        self.begin()
        return norm

    def remove(self) -> None:
        """Drop the hooks and give the optimizer its own step back."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.optimizer.step = self.real_step  # type: ignore[method-assign]


def check_world(cfg: Any, world_size: int) -> None:
    """UserError when ``fused_backward`` runs on several processes (DDP/FSDP reduce gradients
    after backward; the hooks would step unreduced gradients)."""
    if getattr(cfg, "fused_backward", False) and world_size > 1:
        raise UserError(f"config key 'fused_backward: true' runs on one process only (got {world_size}): DDP/FSDP "
                        f"reduce gradients after backward, when the hooks have already stepped; set "
                        f"fused_backward: false or run one process")
