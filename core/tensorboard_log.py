"""TensorBoard logging beside metrics.jsonl and wandb: scalars, preview grids and validation figures.

Switched on by the run keys ``tensorboard`` / ``tensorboard_dir`` (``core.config.RunConfig``, beside
the wandb keys). Offline by nature (event files in ``<run>/tensorboard/``, or ``tensorboard_dir``); view them with
``tensorboard --logdir <run>/tensorboard``. An optional integration: the package missing, a write
that fails or anything else the writer raises is ONE warning and the run continues without
TensorBoard (metrics.jsonl and the preview PNGs are written either way). A resumed run purges the
events after the update it resumes from (TensorBoard's ``purge_step``), as metrics.jsonl drops
its records of the updates a crash threw away.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch

from core.integrations import Integration

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """One SummaryWriter of the main rank; every method is a no-op once it failed."""

    def __init__(self, folder: str, resume_step: Optional[int] = None) -> None:
        self.folder = folder
        self.guard = Integration("tensorboard")
        self.writer: Any = self.guard.call("start", lambda: self._start(resume_step))

    def _start(self, resume_step: Optional[int]) -> Any:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        os.makedirs(self.folder, exist_ok=True)
        purge = resume_step + 1 if resume_step is not None else None
        return SummaryWriter(self.folder, purge_step=purge, flush_secs=30)

    @property
    def active(self) -> bool:
        return self.writer is not None and self.guard.enabled

    def scalars(self, step: int, record: Mapping[str, Any]) -> None:
        """Every finite number of ``record`` as a scalar at ``step``."""
        if not self.active:
            return

        def write() -> None:
            for key, value in record.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or key in ("step", "time"):
                    continue
                self.writer.add_scalar(key, float(value), int(step))
        self.guard.call("log scalars", write)

    def image(self, step: int, name: str, image: torch.Tensor) -> None:
        """One (3, H, W) [0, 1] image (a preview grid, a figure) at ``step``."""
        if self.active:
            self.guard.call(f"log image {name}", lambda: self.writer.add_image(name, image.clamp(0, 1), int(step)))

    def figure_file(self, step: int, name: str, path: str) -> None:
        """A PNG written by the run (e.g. the validation figure) as an image."""
        if not self.active or not os.path.isfile(path):
            return

        def read() -> torch.Tensor:
            from PIL import Image
            import numpy as np

            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
            return torch.from_numpy(array).permute(2, 0, 1).float().div(255)
        image = self.guard.call(f"read {os.path.basename(path)}", read)
        if image is not None:
            self.image(step, name, image)

    def flush(self) -> None:
        if self.active:
            self.guard.call("flush", self.writer.flush)

    def close(self) -> None:
        if self.writer is not None:
            self.guard.call("close", self.writer.close)
            self.writer = None
