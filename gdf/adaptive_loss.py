"""AdaptiveLossWeight: weight = 1 / (running loss of the sample's logSNR bucket)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ._buckets import ema_update_buckets
from ._checks import int_at_least, pair
from .loss_weights import BaseLossWeight

__all__ = ["AdaptiveLossWeight"]


class AdaptiveLossWeight(BaseLossWeight):
    """Bucketed EMA of the raw loss over logSNR; the weight is its reciprocal.

    ``bucket_ranges`` = linspace(lo, hi, buckets − 1) are the edges (299 for the default 300
    buckets); ``index(λ)`` = searchsorted(edges, λ) (left side); weight(λ) =
    clamp(1/bucket_losses[index(λ)], weight_range). ``update_buckets`` is called once per
    micro-step with the unweighted per-sample losses. The state must travel with checkpoints:
    ``state_dict()`` / ``load_state_dict()`` (also accepts the official info.json lists).
    """

    def __init__(self, logsnr_range: Sequence[float] = (-10, 10), buckets: int = 300,
                 weight_range: Sequence[float] = (1e-7, 1e7)):
        lo, hi = pair("logsnr_range", logsnr_range)
        int_at_least("buckets", buckets, 3)
        self.bucket_ranges = torch.linspace(lo, hi, buckets - 1)
        self.bucket_losses = torch.ones(buckets)
        self.weight_range = list(pair("weight_range", weight_range))

    def index(self, logSNR: torch.Tensor) -> torch.Tensor:
        """Bucket of each λ: 0 for λ <= edges[0], i for edges[i−1] < λ <= edges[i], last above."""
        edges = self.bucket_ranges.to(logSNR.device)
        return torch.searchsorted(edges, logSNR.to(edges.dtype).contiguous())

    def weight(self, logSNR):
        indices = self.index(logSNR)
        return (1 / self.bucket_losses.to(logSNR.device)[indices]).clamp(*self.weight_range)

    def update_buckets(self, logSNR: torch.Tensor, loss: torch.Tensor, beta: float = 0.99) -> None:
        """bucket_losses[idx] ← bucket_losses[idx]·beta + loss·(1 − beta), one vectorised write.

        ``loss`` is the raw per-sample loss, shape (B,) like ``logSNR``. If several samples share a
        bucket only the last one's update survives (the reference's behaviour on CPU).
        """
        if loss.shape != logSNR.shape:
            raise ValueError(f"loss must have the shape of logSNR {tuple(logSNR.shape)}, got {tuple(loss.shape)}")
        ema_update_buckets(self.bucket_losses, self.index(logSNR).cpu(), loss.float(), beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{'bucket_ranges': edges, 'bucket_losses': losses}`` (copies, CPU float32)."""
        return {"bucket_ranges": self.bucket_ranges.clone(), "bucket_losses": self.bucket_losses.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output or the info.json form (lists) of the official code."""
        try:
            edges = torch.as_tensor(state["bucket_ranges"], dtype=torch.float32)
            losses = torch.as_tensor(state["bucket_losses"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"state must hold 'bucket_ranges' and 'bucket_losses' ({err})") from None
        if edges.dim() != 1 or losses.dim() != 1 or losses.numel() != edges.numel() + 1:
            raise ValueError(
                "state: bucket_losses must have one more entry than bucket_ranges, got "
                f"{tuple(losses.shape)} and {tuple(edges.shape)}"
            )
        self.bucket_ranges, self.bucket_losses = edges.clone(), losses.clone()
