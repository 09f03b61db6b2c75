"""Training previews: when they are due and how they run (eval mode, no autograd, a fixed
generator per preview, grids written by the main rank). The job's ``preview(batch)`` makes the images."""
from __future__ import annotations

from typing import Any

from core.seeding import seeded_generator
from core.validation import eval_mode

__all__ = ["preview_due", "run_preview"]


def preview_due(cfg: Any, step: int) -> bool:
    """``preview_every`` (None = ``save_every``, 0 = never) boundaries and the last update."""
    every = cfg.preview_every if cfg.preview_every is not None else cfg.save_every
    return bool(every) and (step % every == 0 or step == cfg.updates)


def run_preview(trainer: Any, step: int) -> None:
    """The job's preview of the fixed preview batch, every trained network in eval mode; the job's
    ``preview_metrics(grids)`` (e.g. CLIP scores) are logged at ``step`` like the validation loss."""
    if trainer.batches.preview_batch is None:
        return
    with eval_mode([getattr(trainer, n) for n in trainer.trained_modules()]):
        trainer.preview_generator = seeded_generator(trainer.cfg.seed, "preview")
        grids = trainer.preview(trainer.batches.preview_batch)
        metrics = getattr(trainer, "preview_metrics", lambda _grids: {})(grids)  # an optional job hook
    if trainer.is_main:
        trainer.logger.log_previews(step, grids, trainer.cfg.num_preview_images)
        if metrics:
            trainer.logger.status.update(metrics)  # first: log() redraws the progress line
            trainer.logger.log(step, metrics)
