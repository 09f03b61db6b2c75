"""bf16 "master-free" optimizer steps with stochastic rounding.

Two ways to train with bf16 compute (documented in README "Memory and speed"):

* fp32 master weights (default): the trained network is stored in float32 (``dtype`` unset) and
  runs under bf16 autocast; the optimizer updates the fp32 weights. 4 bytes/param of weights.
* master-free (``dtype: bfloat16`` + ``stochastic_rounding: true``): the network is stored in bf16
  (2 bytes/param). Each update is computed in float32 for ONE parameter tensor at a time (so the
  transient fp32 copy is one tensor, not the model) and written back to bf16 with stochastic
  rounding, which keeps small updates from vanishing: rounding up with probability equal to the
  distance to the lower bf16 neighbour makes the rounded weight equal the fp32 result in
  expectation. Optimizer states are kept in float32.
"""
from __future__ import annotations

import types
from typing import Callable, Optional

import torch

__all__ = ["stochastic_round_to_bf16", "enable_stochastic_rounding"]


def stochastic_round_to_bf16(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round a float32 tensor to bfloat16 stochastically (unbiased in expectation).

    bf16 keeps the upper 16 bits of a float32; adding a uniform random 16-bit integer to the lower
    bits before truncating rounds up with probability (dropped bits) / 2^16.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_to_bf16: x must be float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # Non-finite values keep their value (the noise could turn an inf into a NaN).
    rounded = torch.where(torch.isfinite(x), (bits + noise) & -65536, bits)
    return rounded.view(torch.float32).to(torch.bfloat16)


def enable_stochastic_rounding(optimizer: torch.optim.Optimizer,
                               generator: Optional[torch.Generator] = None) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` update bf16 parameters in float32 and round them back stochastically.

    Parameters of other dtypes are stepped normally. The optimizer must be element-wise per tensor
    (AdamW, Adafactor, SGD, ...), since each bf16 tensor is stepped on its own. Returns the same
    optimizer object (its ``step`` is replaced on the instance, before any LR scheduler wraps it).
    """
    plain_step: Callable = optimizer.step

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("stochastic rounding: closures are not supported")
        groups = optimizer.param_groups
        saved = [list(g["params"]) for g in groups]
        low = [[p for p in ps if p.dtype == torch.bfloat16 and p.grad is not None] for ps in saved]
        try:
            # 1) everything that is not bf16, in one normal step
            for g, ps, lows in zip(groups, saved, low):
                g["params"] = [p for p in ps if not any(p is q for q in lows)]
            plain_step()
            # 2) each bf16 tensor alone: fp32 view of weight and grad, step, round back
            for gi, lows in enumerate(low):
                for p in lows:
                    for g in groups:
                        g["params"] = []
                    groups[gi]["params"] = [p]
                    weight16, grad16 = p.data, p.grad
                    p.data, p.grad = weight16.float(), grad16.float()
                    try:
                        plain_step()
                        weight16.copy_(stochastic_round_to_bf16(p.data, generator))
                    finally:
                        p.data, p.grad = weight16, grad16
        finally:
            for g, ps in zip(groups, saved):
                g["params"] = ps
        return None

    # A bound method (LR schedulers wrap ``optimizer.step.__func__``).
    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
    return optimizer
