"""AdaptiveTrainSchedule: samples logSNR buckets proportionally to a running loss estimate."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from . import _rng
from ._buckets import ema_update_buckets
from ._checks import int_at_least, pair
from .schedules import BaseSchedule

__all__ = ["AdaptiveTrainSchedule"]


class AdaptiveTrainSchedule(BaseSchedule):
    """Sample λ from ``buckets`` equal-width logSNR buckets with probability ∝ probs + min_probs.

    Only samples (a given t is an error). ``update_buckets`` keeps an EMA of the loss per bucket;
    ``state_dict`` / ``load_state_dict`` save and restore that state with a checkpoint.
    """

    accepts_t = False

    def __init__(self, logsnr_range: Sequence[float] = (-10, 10), buckets: int = 100,
                 min_probs: float = 0.0, **base_kwargs):
        lo, hi = pair("logsnr_range", logsnr_range)
        int_at_least("buckets", buckets, 1)
        if min_probs < 0:
            raise ValueError(f"min_probs must be >= 0, got {min_probs!r}")
        edges = torch.linspace(lo, hi, buckets + 1)
        self.bucket_ranges = torch.stack([edges[:-1], edges[1:]], dim=1)  # (buckets, 2): [lo, hi)
        self.bucket_probs = torch.ones(buckets)
        self.min_probs = float(min_probs)
        super().__init__(**base_kwargs)

    def schedule(self, t, batch_size, generator=None):
        if t is not None:
            raise ValueError("t must be None for AdaptiveTrainSchedule (it samples logSNR itself)")
        weights = self.bucket_probs + self.min_probs
        probs = weights / weights.sum()
        chosen = _rng.multinomial(probs, batch_size, generator)  # draw order: buckets, then offsets
        ranges = self.bucket_ranges.to(chosen.device)[chosen]
        return _rng.rand(batch_size, generator).to(ranges.device) * (ranges[:, 1] - ranges[:, 0]) + ranges[:, 0]

    def bucket_index(self, logSNR: torch.Tensor) -> torch.Tensor:
        """Index of the first bucket with lo <= λ < hi (0 when λ lies in none), on the CPU."""
        ranges = self.bucket_ranges.to(logSNR.device)
        lam = logSNR.reshape(-1, 1).to(ranges.dtype)
        inside = (ranges[None, :, 0] <= lam) & (ranges[None, :, 1] > lam)
        return inside.float().argmax(-1).cpu()

    def update_buckets(self, logSNR: torch.Tensor, loss: torch.Tensor, beta: float = 0.99) -> None:
        """EMA of the per-sample ``loss`` into the bucket of each ``logSNR`` (last write wins)."""
        ema_update_buckets(self.bucket_probs, self.bucket_index(logSNR), loss, beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bucket state: ``bucket_ranges`` (buckets, 2) and ``bucket_probs`` (buckets,)."""
        return {"bucket_ranges": self.bucket_ranges.clone(), "bucket_probs": self.bucket_probs.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output (tensors or nested lists, e.g. from JSON)."""
        try:
            ranges = torch.as_tensor(state["bucket_ranges"], dtype=torch.float32)
            probs = torch.as_tensor(state["bucket_probs"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"state must hold 'bucket_ranges' and 'bucket_probs' ({err})") from None
        if ranges.dim() != 2 or ranges.size(1) != 2 or probs.shape != (ranges.size(0),):
            raise ValueError(
                f"state: bucket_ranges must be (N, 2) and bucket_probs (N,), got {tuple(ranges.shape)} "
                f"and {tuple(probs.shape)}"
            )
        self.bucket_ranges, self.bucket_probs = ranges.clone(), probs.clone()
