"""The training batches of one rank: the data pipeline, its first batch fetched early (an empty
or missing dataset fails before any model loads), the fixed preview samples, and the position
saved with every checkpoint (gathered from all ranks) for exact resume."""
from __future__ import annotations

import json
import logging
from typing import Any, Optional

import torch

from core import distributed as D

__all__ = ["Batches"]

log = logging.getLogger("cascade.train")


class Batches:
    """Iterates ``pipeline``; keeps the first ``num_preview`` samples of the first batch.

    With a ``device``, each batch goes through the pipeline's ``to_device(batch, device)`` when it
    has one (uint8 images are moved and converted to float there, on the training device).
    """

    def __init__(self, pipeline: Any, num_preview: int, device: Optional[torch.device] = None) -> None:
        self.pipeline = pipeline
        self.num_preview = num_preview
        to_device = getattr(pipeline, "to_device", None) if device is not None else None
        self._to_device = (lambda batch: to_device(batch, device)) if callable(to_device) else (lambda batch: batch)
        self._iter = iter(pipeline)
        self._prefetched: Optional[dict] = next(self._iter)  # fails early on an empty dataset
        self.preview_batch: Optional[dict] = None
        self.epoch: Optional[int] = None  # the data epoch of the latest batch (the progress line shows it)

    def next(self) -> dict:
        if self._prefetched is not None:
            batch, self._prefetched = self._prefetched, None
        else:
            batch = next(self._iter)
        batch = self._to_device(batch)
        self.epoch = batch.get("epoch") if isinstance(batch.get("epoch"), int) else self.epoch
        if self.preview_batch is None:  # the first samples of the first batch, for every preview
            keep = min(self.num_preview, len(batch["captions"]))
            # kept on the CPU, where the previews have always found it
            self.preview_batch = {k: v[:keep].to("cpu", copy=True) if isinstance(v, torch.Tensor) else list(v[:keep])
                                  for k, v in batch.items() if isinstance(v, (torch.Tensor, list))}
        return batch

    def state_dict(self) -> dict:
        """Every rank's pipeline position (collective), for ``data.json``."""
        state = self.pipeline.state_dict() if hasattr(self.pipeline, "state_dict") else None
        return {"world_size": D.get_world_size(), "ranks": D.all_gather_object(state)}

    @staticmethod
    def resume_state(path: Optional[str], rank: int, world_size: int) -> Optional[dict]:
        """This rank's saved position from ``data.json``; None (restart the data) when the
        checkpoint was written by another number of processes."""
        if not path:
            return None
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        ranks = data.get("ranks") or []
        if data.get("world_size") != world_size:
            if ranks:
                log.warning("the checkpoint was written with %s process(es), this run has %d: the data position "
                            "restarts (weights and optimizer resume exactly)", data.get("world_size"), world_size)
            return None
        return ranks[rank] if rank < len(ranks) else None

    def close(self) -> None:
        close = getattr(self.pipeline, "close", None)
        if callable(close):
            close()
