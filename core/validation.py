"""Held-out validation: a loss that is comparable across updates, runs, resumes and process counts.

The core knows a held-out pipeline, a schedule, a reduction and a metrics dict; the job supplies
the deterministic evaluation of ONE sample:

    validation_losses(sample, t, generator, model) -> {"loss": (T,), "mse": (T,)}

``sample`` is a one-sample batch (same keys as a training batch), ``t`` the fixed grid of
:func:`timestep_grid`, ``generator`` a CPU generator seeded by the sample's identity (the name of
its shard within the dataset and its key, as core/data keys its own draws; not the run's seed, so
runs with other seeds get the same draws), ``model`` the network
standing in for the job's first trained network (itself, then its EMA when there is one). ``loss``
carries the training loss weight, ``mse`` does not. Samples are evaluated one at a time so that
no result depends on which other samples share a forward (batch composition changes the low bits
of a batched forward), hence the same figures for any split over ranks.

Reading: every rank reads the held-out set through its own one-process pipeline (``crop:
center``, no random bucket, no workers), in the same order; sample ``j`` is evaluated by rank
``j % world_size`` (every rank evaluates everything when a network is FSDP-sharded, since its
forwards are collective), the per-sample results are gathered and reduced in sample order with
``math.fsum``: the same value for 1 or N processes.

Logged keys (one metrics.jsonl record per evaluation): ``val_loss``, ``val_mse``,
``val_mse_t<t>`` per grid point, ``val_samples``, and the same with ``val_ema_`` for the EMA.
``keep_best``: the published ``.safetensors`` files of the update with the lowest finite
``val_loss`` are written as ``<stem>_best.safetensors`` (atomic writes; the best value is saved
with every checkpoint in ``validation.json`` so a resumed run keeps comparing against it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from core import distributed as D
from core.config import doc
from core.errors import UserError
from core.seeding import seeded_generator

__all__ = ["ValidationConfig", "Validation", "timestep_grid", "reduce_rows", "eval_mode", "TIMESTEPS"]

log = logging.getLogger("cascade.train")

#: grid points per sample: the midpoints of 8 equal buckets of [0, 1] (the end points have an
#: infinite logSNR under the cosine schedule)
TIMESTEPS = 8


def timestep_grid(n: int = TIMESTEPS) -> torch.Tensor:
    """``(n,)`` float32 times ``(i + 0.5) / n``, the same for every sample and every evaluation."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


@dataclass
class ValidationConfig:
    """Held-out validation keys (core/validation.py)."""

    validation_webdataset_path: Any = doc(
        None, "Held-out dataset for the validation loss: any form webdataset_path accepts. Its samples are read "
              "with the training data keys (image_size, filters, captions) but crop: center and no random bucket, "
              "and evaluated at 8 fixed timesteps with noise seeded by each sample's identity, without caption or "
              "image-embedding dropout, in eval mode. None = no validation.")
    validate_every: Optional[int] = doc(
        None, "Validation period in optimizer updates (also at the end of the run); None = only at the end.")
    validation_batches: Optional[int] = doc(
        None, "Global batches (of batch_size samples) of the held-out set per evaluation: its first "
              "validation_batches * batch_size samples in a fixed order; None = the whole held-out set "
              "(set it for a large one).")
    keep_best: bool = doc(
        False, "Also keep the published weight files of the update with the lowest val_loss as "
               "<name>_best.safetensors in the run folder (needs validation_webdataset_path).")

    def validate_validation(self) -> None:
        vp = self.validation_webdataset_path
        if vp is not None and (not vp or not (isinstance(vp, str) or (isinstance(vp, (list, tuple))
                                                                       and all(isinstance(x, str) and x for x in vp)))):
            raise UserError(f"config key 'validation_webdataset_path': expected a path/URL or a list of them, got {vp!r}")
        for key in ("validate_every", "validation_batches"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"config key '{key}' must be an integer >= 1 or null, got {value!r}")
            if value is not None and vp is None:
                raise UserError(f"config key '{key}' needs validation_webdataset_path (the held-out dataset)")
        if not isinstance(self.keep_best, bool):
            raise UserError(f"config key 'keep_best' must be true or false, got {self.keep_best!r}")
        if self.keep_best and vp is None:
            raise UserError("config key 'keep_best: true' needs validation_webdataset_path (the held-out dataset)")


@contextlib.contextmanager
def eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Eval mode and no autograd inside; every module gets its own previous mode back."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def reduce_rows(rows: list[tuple[int, str, list[float], list[float]]], t: torch.Tensor) -> dict[str, float]:
    """The metrics of gathered ``(sample index, prefix, loss per t, mse per t)`` rows: sorted by
    sample, summed exactly (``math.fsum``), so the order the ranks return them in does not matter."""
    out: dict[str, float] = {}
    for prefix in sorted({r[1] for r in rows}, key=lambda p: (len(p), p)):
        mine = sorted((r for r in rows if r[1] == prefix), key=lambda r: r[0])
        n = len(mine)
        loss = [math.fsum(r[2][i] for r in mine) / n for i in range(len(t))]
        mse = [math.fsum(r[3][i] for r in mine) / n for i in range(len(t))]
        out[f"{prefix}_loss"] = math.fsum(loss) / len(t)
        out[f"{prefix}_mse"] = math.fsum(mse) / len(t)
        for ti, m in zip(t.tolist(), mse):
            out[f"{prefix}_mse_t{ti:.3f}"] = m
        out[f"{prefix}_samples"] = n
    return out


class Validation:
    """The held-out evaluation of one run (created by the core when validation_webdataset_path is set)."""

    def __init__(self, trainer: Any) -> None:
        from core.data import DataConfig
        from core.data.sources import expand_named_sources
        from core.state import ValueState

        cfg = trainer.cfg
        if not callable(getattr(trainer, "validation_losses", None)):
            raise UserError(f"config key 'validation_webdataset_path': {type(trainer).__name__} has no validation "
                            f"loss (validation_losses); remove the key")
        self.trainer, self.cfg = trainer, cfg
        self.t = timestep_grid()
        data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DataConfig)}
        data.update(webdataset_path=cfg.validation_webdataset_path, crop="center", bucket_random_ratio=0.0,
                    num_workers=0, resampled=False)
        self.data = DataConfig(**data)
        try:
            self.names = dict(expand_named_sources(self.data.webdataset_path))
        except Exception as exc:  # noqa: BLE001 - DataError: re-worded with the config key
            raise UserError(f"config key 'validation_webdataset_path': {exc}") from None
        self.limit = cfg.validation_batches * cfg.batch_size if cfg.validation_batches else None
        first = self._samples()  # a missing or empty held-out set fails now, before any model loads
        if next(first, None) is None:
            raise UserError(f"config key 'validation_webdataset_path': no usable sample in {self.data.webdataset_path!r}")
        first.close()
        self.best: Optional[dict] = None  # {"step", "val_loss"} of the best evaluation so far
        if cfg.keep_best:
            trainer.register_state("validation.json", ValueState(lambda: {"best": self.best}, self._load))

    def _load(self, state: dict) -> None:
        self.best = state.get("best")

    def due(self, step: int) -> bool:
        every = self.cfg.validate_every
        return step == self.cfg.updates or bool(every) and step % every == 0

    def _samples(self) -> Iterator[tuple[int, tuple[str, str], dict]]:
        """``(index, identity, one-sample batch)`` of the held-out set, in a fixed order."""
        from core.data import build_pipeline

        # seed 0, not the run's: runs with other seeds see the same samples in the same order
        pipeline = build_pipeline(self.data, batch_size=max(1, self.cfg.batch_size), seed=0,
                                  num_workers=0, partial_batches=True, source_key="validation_webdataset_path")
        seen: set[tuple[str, str]] = set()
        try:
            for batch in pipeline:
                fresh = False
                for i, (url, key) in enumerate(zip(batch["urls"], batch["keys"])):
                    identity = (self.names.get(url, url), key)
                    if identity in seen or batch["sample_epochs"][i] > 0:
                        continue
                    fresh = True
                    if self.limit is not None and len(seen) >= self.limit:
                        return
                    seen.add(identity)
                    sample = {k: v[i:i + 1] for k, v in batch.items() if isinstance(v, (torch.Tensor, list))}
                    yield len(seen) - 1, identity, sample
                if not fresh or pipeline.epoch >= 1:
                    return  # epoch 0 is over: every held-out sample was seen once
        finally:
            pipeline.close()

    def evaluate(self) -> dict[str, float]:
        """The metrics of the current weights (collective: every rank calls it)."""
        trainer = self.trainer
        first = trainer.trained_modules()[0]
        models = {"val": trainer.unwrapped(first)}
        if trainer.ema is not None:
            models["val_ema"] = trainer.ema.module
        world, rank = trainer.dist.world_size, trainer.dist.rank
        if any(D.is_sharded(getattr(trainer, n)) for n in trainer.trained_modules() + trainer.frozen_modules()):
            world, rank = 1, 0  # sharded forwards are collective: every rank runs every sample
        modules = [getattr(trainer, n) for n in trainer.trained_modules()] + list(models.values())
        rows = []
        with eval_mode(modules):
            for index, identity, sample in self._samples():
                if index % world != rank:
                    continue
                for prefix, model in models.items():
                    g = seeded_generator("validation", *identity)  # no run seed: comparable across runs
                    out = trainer.validation_losses(sample, self.t.clone(), g, model)
                    rows.append((index, prefix, [float(v) for v in out["loss"].float().cpu()],
                                 [float(v) for v in out["mse"].float().cpu()]))
        if world > 1:
            rows = [r for part in D.all_gather_object(rows) for r in part]
        return reduce_rows(rows, self.t)

    def run(self, step: int) -> Optional[dict[str, float]]:
        """Evaluate when ``step`` is due: log the metrics and, with keep_best, write a new best."""
        if not self.due(step):
            return None
        metrics = self.evaluate()
        trainer = self.trainer
        shown = {k: metrics[k] for k in ("val_loss", "val_ema_loss") if k in metrics}
        trainer.logger.status.update(shown)  # first: log() redraws the progress line
        trainer.logger.log(step, metrics)
        log.info("validation at update %d: %s", step, ", ".join(f"{k} {v:.5f}" for k, v in shown.items()))
        value = metrics["val_loss"]
        if self.cfg.keep_best and math.isfinite(value) and (self.best is None or value < self.best["val_loss"]):
            self.keep(step, value)
        return metrics

    def keep(self, step: int, value: float) -> None:
        """Write ``<stem>_best.safetensors`` of every published weight file (collective)."""
        from core.checkpoint import write_on_main_rank

        trainer = self.trainer
        names = [n for n in trainer.state.names(published=True) if n.endswith(".safetensors")]
        values = trainer.state.snapshot(names)
        bad = trainer.state.nonfinite(values) if trainer.is_main else None
        if D.any_rank(bad is not None, trainer.device):
            log.warning("update %d: not kept as the best weights: %s holds a NaN or an infinity", step, bad)
            return
        published, _ = trainer.state.writers(values)
        run_dir = Path(trainer.run_dir)

        def write() -> None:
            for name, writer in published.items():
                writer(str(run_dir / f"{name[:-len('.safetensors')]}_best.safetensors"))

        write_on_main_rank(write, trainer.is_main, trainer.device, f"the best weights of update {step}")
        self.best = {"step": step, "val_loss": value}
        log.info("update %d has the lowest val_loss so far (%.5f): kept as *_best.safetensors", step, value)
