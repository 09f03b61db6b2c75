"""TrainingCore: the one training loop every ``train/train_*.py`` job shares.

The loop, :meth:`TrainingCore.train`, knows no network and reads top to bottom::

    batch -> loss -> backward (x grad_accum_steps) -> clip -> step -> EMA -> log -> validate -> preview -> save

A job is a subclass that says what it builds, what trains and what its loss is:

* ``Config``: its config dataclass (a ``TrainingConfig`` subclass); ``description``: one line for --help;
* ``build_models()``: build or load networks and register each one: ``add_trained(name, module,
  params=None, save_as=None, wrap=True)`` or ``add_frozen(name, module, cast=True, shard=False)``; register extra
  state with ``register_state(file, obj)`` (``state_dict``/``load_state_dict``, see core/state.py);
* ``compute_loss(batch) -> (loss, metrics)``: one micro-step's batch-mean loss; state updates that
  must only happen when the step is finite on every rank go through ``defer(fn)``;
* optional: ``preview(batch)``, ``preview_metrics(grids)``, ``build_pipeline(batch_size, state)``, ``validation_losses``
  (core/validation.py), ``describe(cfg)``, ``memory_spec(cfg, world_size)`` (core/memory.py), ``data_sources(cfg)``.

The core does the rest (docs/ARCHITECTURE.md): freezing, wrapping (dropout, checkpointing, compile, DDP/FSDP),
saving and restoring every registered state object, EMA, lr schedule, non-finite guards, signals, logs, previews.

Randomness: per-sample draws from ``sample_generators(n)``, seeded by (seed, update, micro-step, global sample
index: core/seeding.py); module dropout from the global RNG re-seeded per (seed, rank, update, micro-step).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from core import distributed as D
from core.batches import Batches
from core.checkpoint import load_json, refuse_broken_weights, refuse_nonfinite, write_on_main_rank
from core.config import RunConfig, config_to_dict, doc, save_config
from core.data import DataConfig
from core.ema import EMAConfig
from core.errors import UserError
from core.faults import FaultInjection
from core.models import ModelSet
from core.optim import OptimConfig, ParamGroups
from core.precision import autocast, resolve_autocast_dtype, resolve_frozen_dtype
from core.preview import preview_due, run_preview
from core.seeding import derive_seed, per_sample_generators, seeded_generator
from core.signals import StopSignals
from core.state import ModuleState, StateRegistry, ValueState
from core.validation import Validation, ValidationConfig

log = logging.getLogger("cascade.train")


@dataclass
class TrainingConfig(RunConfig, OptimConfig, EMAConfig, DataConfig, ValidationConfig):
    """Keys shared by every training job: run, optimizer, lr schedule, EMA, data and validation components."""

    generator_dropout: Optional[float] = doc(
        None, "Override the dropout probability of every Dropout layer and attention-weight dropout of the trained network "
              "(None = the architecture's default, 0.1 in Stage C / Stage B's deep levels).")

    def validate_training(self) -> None:
        if self.generator_dropout is not None and not 0.0 <= self.generator_dropout < 1.0:
            raise UserError(f"config key 'generator_dropout' must be in [0, 1), got {self.generator_dropout}")


class TrainingCore(ParamGroups):
    """Base class of every training job (see the module docstring for the contract)."""

    Config: type = TrainingConfig
    description: str = ""
    #: module classes FSDP shards one by one before the root (the job's residual blocks)
    block_types: tuple[type, ...] = ()

    # -- command line and dry run (core/cli.py) ---------------------------------------------
    @classmethod
    def main(cls, argv: Optional[list[str]] = None) -> int:
        """``python3 train/<job>.py CONFIG [--set k=v ...] [--dry-run] [--validate-only] [--resume ...]``."""
        from core.cli import main

        return main(cls, argv)

    @classmethod
    def describe(cls, cfg: Any) -> list[str]:
        """Dry-run lines about what the job builds (model sizes, adapters)."""
        return []

    @classmethod
    def data_sources(cls, cfg: Any) -> dict[str, Any]:
        """``{config key: value}`` of every data set the run reads, for ``--validate-only`` (jobs add or drop theirs)."""
        val = getattr(cfg, "validation_webdataset_path", None)
        return {"webdataset_path": cfg.webdataset_path, **({"validation_webdataset_path": val} if val is not None else {})}

    @classmethod
    def memory_spec(cls, cfg: Any, world_size: int = 1) -> Any:
        """The job's ``core.memory.MemorySpec`` of ONE rank of a ``world_size``-rank run, for the
        dry-run estimate (None: no estimate)."""
        return None

    # -- construction --------------------------------------------------------------------
    def __init__(self, cfg: Any, dist: Any = None, resume: str = "auto") -> None:
        self.cfg = cfg
        self.dist = dist if dist is not None else D.init_distributed()
        self.device: torch.device = self.dist.device
        self.is_main: bool = self.dist.is_main
        self.resume_mode = resume
        self.run_dir = Path(cfg.checkpoint_path) / cfg.experiment_id
        self.output_dir = Path(cfg.output_path) / cfg.experiment_id
        self.step = 0                  # completed optimizer updates
        self.last_saved_step = 0       # backups: a boundary crossed since this step
        self.nonfinite_total = 0       # skipped updates (non-finite loss or gradient)
        self.nonfinite_in_a_row = 0
        self.ema_loss: Optional[float] = None
        self.wandb_run_id: Optional[str] = None
        self.ema = self.logger = self.pipeline = self.batches = self.validation = None
        self.fused: Any = None  # fused_backward: core.fused_backward.FusedBackward, its per-parameter step hooks
        self.state = StateRegistry()
        self.micro_step = (0, 0)       # (update, micro-step) being computed
        self.preview_generator: Optional[torch.Generator] = None  # seeded anew for every preview
        self.autocast_dtype = resolve_autocast_dtype(cfg.precision, self.device, cfg.allow_tf32)
        self._models = ModelSet(self)
        self._deferred: list[Callable[[], None]] = []
        self._signals = StopSignals(self.run_dir, self.is_main)  # stop; sample now / save now (core/triggers.py)
        self._faults = FaultInjection()

    # -- hooks (override in a job) ----------------------------------------------------------
    def build_models(self) -> None:
        """Build/load every network and register it (``add_trained`` / ``add_frozen``)."""
        raise NotImplementedError

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, Any]]:
        """One micro-step: the batch-mean loss (before accumulation scaling) and metrics."""
        raise NotImplementedError

    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """Images for the preview grids: ``{name: (N,3,H,W) in [0,1]}``."""
        return {}

    def model_identity(self) -> dict[str, Any]:
        """What a checkpoint must have been trained with to resume this run, e.g. the trained
        network's architecture: ``{key: JSON value}``, saved in ``trainer.json`` and compared on
        resume (before any data or model loads); a difference is a UserError naming the key."""
        return {}

    def build_pipeline(self, batch_size: int, state: Optional[dict]) -> Any:
        """The training batches of this rank (``batch_size`` per micro-step)."""
        from core.data import build_pipeline

        return build_pipeline(self.cfg, batch_size=batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
                              seed=self.cfg.seed, num_workers=self.cfg.num_workers, state=state, image_dtype="uint8")

    # -- registration -----------------------------------------------------------------------
    def add_trained(self, name: str, module: nn.Module, params: Optional[list[nn.Parameter]] = None,
                    save_as: Optional[str] = None, wrap: bool = True) -> nn.Module:
        """Register a network that trains, as attribute ``name``. ``params``: the parameters that
        train (default: all; the others are frozen); ``save_as``: file stem of its checkpoint file
        (official key layout, published); ``wrap=False``: no DDP/FSDP wrapper (its gradients are
        averaged over ranks by the core), for trained parts living inside a frozen network."""
        self._models.add_trained(name, module, params, save_as, wrap)
        if save_as is not None:
            self.state.register(f"{save_as}.safetensors", ModuleState(lambda: getattr(self, name), self.is_main),
                                publish=True, required=True)
        return module

    def add_frozen(self, name: str, module: nn.Module, cast: bool = True, shard: bool = False,
                   quantize: bool = False) -> nn.Module:
        """Register a network that never trains, as attribute ``name``: eval mode, no gradients,
        on the device, stored in the frozen dtype unless ``cast=False``. ``shard=True``: with
        ``use_fsdp`` on several processes it is FSDP2-sharded like the trained networks (per
        ``block_types`` block, then the root), for a large frozen base; every rank must then run
        the same forwards through it (the core's previews do). ``quantize``: in ``base_dtype`` (core/quantize.py)."""
        return self._models.add_frozen(name, module, self.frozen_dtype if cast else None, self.device, shard, quantize)

    def register_state(self, name: str, obj: Any, publish: bool = False, required: bool = False,
                       restore: bool = True) -> None:
        """Save ``obj`` as file ``name`` with every checkpoint (see ``StateRegistry.register``)."""
        self.state.register(name, obj, publish=publish, required=required, restore=restore)

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after this micro-step's loss proved finite on every rank (else drop it)."""
        self._deferred.append(fn)

    # -- helpers for the hooks --------------------------------------------------------------
    def unwrapped(self, name: str) -> nn.Module:
        """The plain module behind a DDP wrapper (FSDP2 modules are their own module)."""
        return D.unwrap_model(getattr(self, name))

    def trained_modules(self) -> list[str]:
        """Names of the registered trained networks, in registration order."""
        return list(self._models.trained)

    def frozen_modules(self) -> list[str]:
        """Names of the registered frozen networks, in registration order."""
        return list(self._models.frozen)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer sees: the trained modules' parameters that require grad, in order."""
        return self._models.trainable_parameters()

    def preview_models(self) -> dict[str, nn.Module]:
        """``{name: network}`` to sample previews with: the first trained network and its EMA."""
        name = self._models.first_trained()
        models = {name: self.unwrapped(name)}
        if self.ema is not None:
            models[f"{name}_ema"] = self.ema.module
        return models

    def sample_generators(self, n_local: int) -> list[torch.Generator]:
        """One generator per sample of this rank's micro-batch (keyed by its global index)."""
        step, micro = self.micro_step
        return per_sample_generators(self.cfg.seed, step, micro, self.dist.rank * n_local, n_local)

    def batch_generator(self, purpose: str = "batch") -> torch.Generator:
        """A CPU generator shared by all ranks for one draw per (global) batch."""
        return seeded_generator(self.cfg.seed, purpose, *self.micro_step)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the trained network's forward (bf16 on capable GPUs, nothing on CPU)."""
        return autocast(self.device, self.autocast_dtype)

    @property
    def model_dtype(self) -> torch.dtype:
        """Storage dtype of the trained network (``dtype`` key)."""
        return getattr(torch, self.cfg.dtype) if self.cfg.dtype else torch.float32

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Storage dtype of the frozen networks (``frozen_dtype`` key, see core/precision.py)."""
        return resolve_frozen_dtype(getattr(self.cfg, "frozen_dtype", None), self.device)

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Folders, resume lookup, data, models, freezing/wrapping, optimizer, state, logger, signals."""
        from core.checkpoint import CheckpointManager, capture_rng_state, check_writable, find_resume, restore_rng_state
        from core.fused_backward import FusedBackward
        from core.optim import OptimizerState, build_lr_scheduler, build_optimizer

        cfg = self.cfg
        self._signals.install()  # first: a signal while weights load ends the run before its first update
        if self.is_main:
            check_writable({"checkpoint_path": self.run_dir, "output_path": self.output_dir})
        D.barrier()
        self.ckpt = CheckpointManager(str(self.run_dir), keep_last=cfg.keep_last, is_main=self.is_main)
        D.barrier()  # rank 0 cleaned up an interrupted save; find_resume checks files, skips broken folders
        found = find_resume(self.resume_mode, self.ckpt)
        paths, where = found if found is not None else ({}, str(self.run_dir))
        if found is not None:
            self._announce_resume(paths, where)
        # Data first: a missing or empty dataset fails in seconds, before any model is loaded.
        state = Batches.resume_state(paths.get("data.json"), self.dist.rank, self.dist.world_size)
        self.pipeline = self.build_pipeline(cfg.per_rank_batch(self.dist.world_size), state)
        self.batches = Batches(self.pipeline, cfg.num_preview_images, self.device)  # uint8 images: float on the device
        self.validation = Validation(self) if cfg.validation_webdataset_path is not None else None
        self.build_models()
        self._models.prepare(cfg, self.device)
        self.state.restore(paths, where)  # model files and job state registered so far
        if cfg.ema_start_iters is not None:
            from core.ema import EMA

            self.ema = EMA(self.unwrapped(source := self._models.first_trained()), cfg)
            stem = self._models.trained[source].save_as or source
            self.register_state(f"{stem}_ema.safetensors", ModuleState(lambda: self.ema.module, self.is_main),
                                publish=True)
            self.state.restore(paths, where)
        self._models.wrap(cfg, self.dist, self.block_types, self.autocast_dtype)
        self.offload = self._models.offload(cfg, self.block_types, self.device)  # after every move of the networks
        params = self.trainable_parameters()
        if not params:
            raise UserError(f"{type(self).__name__}: nothing to train (no parameter requires grad)")
        self.optimizer = build_optimizer(self.optimizer_param_groups(params), cfg.lr, cfg)
        self.fused = FusedBackward.for_run(cfg, self.optimizer, params, self.dist.world_size)  # None: not configured
        self.scheduler = build_lr_scheduler(self.optimizer, cfg, plot=self.run_dir / "lr_schedule.png" if self.is_main else None)
        fsdp = self.dist.world_size > 1 and bool(cfg.use_fsdp)
        optimizer = OptimizerState(self.optimizer, self._models.networks, fsdp, self.is_main, str(self.run_dir))
        self.register_state("optimizer.pt", optimizer, required=True)  # always saved: missing = broken folder
        self.register_state("scheduler.pt", self.scheduler, required=True)
        self.register_state("rng.pt", ValueState(capture_rng_state, restore_rng_state), required=True)
        self.register_state("data.json", self.batches, restore=False)
        self.register_state("trainer.json", ValueState(self._trainer_state, self._load_trainer_state), required=True)
        self.state.restore(paths, where)
        if self.is_main:
            save_config(cfg, str(self.run_dir / "config.yaml"))
        from core.logging import RunLogger

        self.logger = RunLogger(str(self.run_dir), cfg, self.is_main, total_steps=cfg.updates, wandb_project=cfg.wandb_project,
                                wandb_entity=cfg.wandb_entity, run_id=self.wandb_run_id, start_step=self.step,
                                resume_step=self.step, preview_dir=str(self.output_dir))
        self.wandb_run_id = getattr(self.logger, "run_id", None) or self.wandb_run_id

    def _announce_resume(self, paths: dict[str, str], where: str) -> None:
        trainer = load_json(paths["trainer.json"]) if "trainer.json" in paths else {}
        # checkpoints written before "identity" existed kept its keys at the top level
        saved = trainer.get("identity", trainer)
        for key, now in self.model_identity().items():
            if key in saved and saved[key] != now:
                raise UserError(f"checkpoint in {where} was trained with {key} '{saved[key]}' but this run has "
                                f"'{now}'; fix {key} or use another experiment_id")
        log.info("resuming from the checkpoint of update %s in %s", trainer.get("step"), where)
        if self.is_main:
            print(f"resuming from update {trainer.get('step')} ({where})", flush=True)

    def _trainer_state(self) -> dict:
        return {"step": self.step, "identity": self.model_identity(), "experiment_id": self.cfg.experiment_id,
                "world_size": self.dist.world_size, "nonfinite_total": self.nonfinite_total,
                "ema_loss": self.ema_loss, "wandb_run_id": self.wandb_run_id, "config": config_to_dict(self.cfg)}

    def _load_trainer_state(self, state: dict) -> None:
        self.step = self.last_saved_step = int(state.get("step", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.ema_loss, self.wandb_run_id = state.get("ema_loss"), state.get("wandb_run_id")

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.setup()
        self.train()

    def train(self) -> None:
        """batch -> loss -> backward (accumulated) -> clip -> step -> EMA -> log -> validate -> preview -> save."""
        cfg, accum = self.cfg, self.cfg.grad_accum_steps
        if self.step >= cfg.updates:
            log.info("nothing to do: the run already reached %d of %d updates", self.step, cfg.updates)
            return
        log.info("training %s from update %d to %d: batch %d = %d process(es) x %d micro-steps x %d", type(self).__name__,
                 self.step, cfg.updates, cfg.batch_size, self.dist.world_size, accum, cfg.per_rank_batch(self.dist.world_size))
        wrapped = self._models.wrapped()
        if self._signals.stopped_during_setup(self.device, self.step + 1):
            return
        while self.step < cfg.updates:
            step = self.step + 1
            started = time.perf_counter()
            losses, metrics, finite = [], {}, True
            for micro in range(accum):
                self.micro_step = (step, micro)
                torch.manual_seed(derive_seed(cfg.seed, "module-rng", self.dist.rank, step, micro))
                batch = self._faults.poison(self.batches.next(), step)
                with contextlib.ExitStack() as stack:
                    for module in wrapped:  # no gradient all-reduce before the last micro-step
                        stack.enter_context(D.grad_sync(module, enabled=micro == accum - 1))
                    loss, metrics = self.compute_loss(batch)
                    ok = not D.any_rank(not bool(torch.isfinite(loss.detach()).all()), self.device)
                    if ok and finite:
                        for fn in self._deferred:
                            fn()
                        (loss / accum).backward()
                    finite = finite and ok
                    self._deferred.clear()
                losses.append(float(loss.detach()))
            grad_norm = self._clip_gradients() if finite else float("nan")
            finite = finite and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()  # a no-op under fused_backward: each parameter stepped inside backward
                self._faults.break_weights(self.trainable_parameters(), step)
                refuse_broken_weights(self.trainable_parameters(), step, self.optimizer, self.ckpt, self.device)
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(step)
                self.nonfinite_in_a_row = 0
            else:
                self._skip_update(step, losses, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step

            loss_value = D.global_mean(sum(losses) / len(losses), self.device)
            if math.isfinite(loss_value):
                self.ema_loss = loss_value if self.ema_loss is None else 0.99 * self.ema_loss + 0.01 * loss_value
            self._log_step(step, loss_value, grad_norm, metrics, time.perf_counter() - started)
            stop, now = self._signals.requested(self.device), self._signals.triggers.due(self.device)  # now: sample/save
            if self.validation is not None:
                self.validation.run(step)  # core/validation.py: held-out loss, keep_best
            if preview_due(cfg, step) or "sample" in now:
                run_preview(self, step)
            if step % cfg.save_every == 0 or step == cfg.updates or stop or "save" in now:
                self.save_checkpoint(step)
            if stop:
                log.warning("received %s: saved the checkpoint of update %d and stopped; run it again to resume", stop, step)
                return
        log.info("training finished at update %d; checkpoint in %s", self.step, self.run_dir)

    def _clip_gradients(self) -> float:
        if self.fused is not None:  # the gradients are gone: the norm was summed in the hooks (nan: non-finite)
            return self.fused.finish()
        D.average_gradients(self._models.unwrapped_trainable())
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")  # None/0: measure only
        return D.clip_grad_norm(params, max_norm)

    def _skip_update(self, step: int, losses: list[float], grad_norm: float) -> None:
        self.nonfinite_total, self.nonfinite_in_a_row = self.nonfinite_total + 1, self.nonfinite_in_a_row + 1
        what = "loss" if not all(math.isfinite(x) for x in losses) else f"gradient norm ({grad_norm})"
        log.warning("update %d skipped: non-finite %s (no weight, EMA or optimizer change); %d skipped so far",
                    step, what, self.nonfinite_total)
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise UserError(f"{self.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient "
                            f"(last at update {step}); lower lr, check the data, or resume from an earlier "
                            f"checkpoint in {self.run_dir}")

    def _log_step(self, step: int, loss: float, grad_norm: float, metrics: dict, elapsed: float) -> None:
        record = {"loss": loss, "ema_loss": self.ema_loss, "grad_norm": grad_norm,
                  "lr": self.optimizer.param_groups[0]["lr"], "nonfinite_skipped": self.nonfinite_total,
                  "step_time_s": elapsed, "images_per_s": self.cfg.batch_size / max(elapsed, 1e-9)}
        for k, v in metrics.items():
            record[k] = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else v
        if step % self.cfg.log_every == 0 or step in (1, self.cfg.updates) or not math.isfinite(grad_norm):
            self.logger.log(step, record)
        else:
            self.logger.progress(step, loss=loss, images_per_s=record["images_per_s"])

    # -- checkpoints ------------------------------------------------------------------------
    def backup_due(self, step: int) -> bool:
        """True when a ``backup_every`` boundary was crossed since the previous save (the reference
        backed up only when a save step was an exact multiple, docs/OFFICIAL.md, Defects)."""
        every = self.cfg.backup_every
        return bool(every) and step // every > self.last_saved_step // every

    def save_checkpoint(self, step: int) -> None:
        """Every registered state object (no NaN/inf), `latest` last; a failed write stops every rank."""
        backup = self.backup_due(step)
        values = self.state.snapshot()  # collective (FSDP gathers, data positions of every rank)
        refuse_nonfinite(self.state.nonfinite(values) if self.is_main else None, step, self.ckpt, self.device)

        def write() -> None:  # rank 0 only
            published, state = self.state.writers(values, self._faults.crash_writer(step))
            self.ckpt.save(step, published, state)
            if backup:
                self.ckpt.backup(step, list(published))
            save_config(self.cfg, str(self.run_dir / "config.yaml"))
            self.logger.plot_loss(str(self.run_dir / "loss.png"))
            log.info("checkpoint of update %d written to %s", step, self.run_dir)

        write_on_main_rank(write, self.is_main, self.device, f"the checkpoint of update {step}")
        self.last_saved_step = step
        D.barrier()

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        self._signals.restore()
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self.batches is not None:
            self.batches.close()
        D.cleanup()


__all__ = ["TrainingCore", "TrainingConfig", "derive_seed"]
