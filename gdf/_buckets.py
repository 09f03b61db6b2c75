"""EMA update of per-bucket statistics, shared by the adaptive schedule and loss weight."""
from __future__ import annotations

import torch

__all__ = ["ema_update_buckets"]


def ema_update_buckets(values: torch.Tensor, idx: torch.Tensor, new: torch.Tensor, beta: float) -> None:
    """In place: ``values[idx] = values[idx]·beta + new·(1 − beta)`` as ONE vectorised assignment.

    This is the reference's update: when several samples fall into the same bucket only one write
    survives, and on CPU that is the last one. We make "the last one wins" explicit (a plain
    indexed assignment with duplicate indices is not guaranteed to pick any particular write).
    """
    idx = idx.reshape(-1).to(device="cpu", dtype=torch.long)
    new = new.detach().reshape(-1).to(device="cpu", dtype=values.dtype)
    if idx.numel() != new.numel():
        raise ValueError(f"loss must have one value per logSNR entry ({idx.numel()}), got {new.numel()}")
    if idx.numel() == 0:
        return
    positions = torch.arange(idx.numel())
    last = torch.full((values.numel(),), -1, dtype=torch.long)
    last.scatter_reduce_(0, idx, positions, reduce="amax")
    hit = (last >= 0).nonzero().squeeze(1)
    chosen = last[hit]
    values[hit] = values[hit] * beta + new[chosen] * (1 - beta)
