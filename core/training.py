"""TrainingCore: the one training loop that every ``train/train_*.py`` script shares.

A script subclasses :class:`TrainingCore` and fills in a few hooks; the loop itself lives in one
place, :meth:`TrainingCore.train`, and reads top to bottom::

    batch -> loss -> backward (x grad_accum_steps) -> clip -> step -> EMA -> log -> preview -> save

Hooks (override in a script; the defaults fit a "train the whole generator" job):

* ``Config``                        the composed config dataclass of the job
* ``build_models()``                load frozen parts and the trained network(s) as attributes
* ``trained_modules()``             names of attributes wrapped with DDP / FSDP (default: generator)
* ``trainable_parameters()``        what the optimizer sees (default: all generator parameters)
* ``compute_loss(batch)``           one micro-step: ``(loss, metrics)``; loss = batch mean
* ``preview(batch)``                ``{name: images (N,3,H,W) in [0,1]}`` for the preview grids
* ``models_to_save()``              ``{file stem: module}`` written as ``<stem>.safetensors``
* ``load_saved_models(paths)``      load those files back when resuming
* ``extra_state()`` / ``load_extra_state(state)``  job-specific training state

Randomness is explicit. Every micro-step draws its per-sample randomness (caption/image/effnet
dropout, diffusion noise and t) from one ``torch.Generator`` per GLOBAL sample index, seeded from
``(seed, step, micro_step, sample index)``, so a run gives the same draws whatever the number of
processes and a resumed run repeats the draws of an uninterrupted one. Module dropout uses the
global torch RNG, re-seeded from ``(seed, rank, step, micro_step)`` before every micro-step.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from core.config import RunConfig, config_to_dict, doc, load_config, parse_cli, save_config
from core.data import DataConfig
from core.ema import EMAConfig
from core.errors import UserError
from core.optim import OptimConfig

log = logging.getLogger("cascade.train")

#: Test hooks (documented in docs/CONFIG.md, "Environment variables"): poison the batch of the
#: listed update steps with NaN; SIGKILL the process in the middle of the checkpoint of a step.
POISON_ENV = "CASCADE_TRAIN_POISON_STEPS"
CRASH_IN_SAVE_ENV = "CASCADE_TRAIN_CRASH_IN_SAVE"


@dataclass
class TrainingConfig(RunConfig, OptimConfig, EMAConfig, DataConfig):
    """Keys shared by every training job: run, optimizer, EMA and data components."""

    generator_dropout: Optional[float] = doc(
        None, "Override the dropout probability of every Dropout layer and attention-weight dropout of the trained network "
              "(None = the architecture's default, 0.1 in Stage C / Stage B's deep levels).")

    def validate_training(self) -> None:
        if self.generator_dropout is not None and not 0.0 <= self.generator_dropout < 1.0:
            raise UserError(f"config key 'generator_dropout' must be in [0, 1), got {self.generator_dropout}")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def world_size_from_env() -> int:
    """The world size a launcher announced (torchrun / slurm), without initialising anything."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _env_steps(name: str) -> set[int]:
    raw = os.environ.get(name, "").strip()
    return {int(s) for s in raw.split(",") if s.strip().isdigit()}


class TrainingCore:
    """Base class of every training job (see the module docstring for the hooks)."""

    Config: type = TrainingConfig
    #: registry kind of the trained network ("stage_c" / "stage_b"); used for checks and dry runs.
    model_kind: str = ""
    #: one line printed by --help
    description: str = ""
    #: FSDP wraps each block of these class names before the root (see core.distributed.wrap_model).
    fsdp_block_classes: tuple[str, ...] = ("ResBlock", "AttnBlock", "TimestepBlock", "FeedForwardBlock")

    # ------------------------------------------------------------------------------------------
    # Command line
    # ------------------------------------------------------------------------------------------
    @classmethod
    def main(cls, argv: Optional[list[str]] = None) -> int:
        """``python3 train/train_x.py CONFIG [--set k=v ...] [--dry-run] [--validate-only]``."""
        args = parse_cli(argv, prog=Path(sys.argv[0]).name, description=cls.description)
        _setup_python_logging()
        if args.validate_only:
            cfg = load_config(cls.Config, args.config, args.overrides, validate_only=True)
            print(f"config OK: {args.config} ({cls.__name__}, model_version {cfg.model_version})")
            return 0
        if args.dry_run:  # lenient about files that are not downloaded yet; says which are missing
            cfg = load_config(cls.Config, args.config, args.overrides, validate_only=True,
                              world_size=world_size_from_env())
            cls.dry_run(cfg)
            return 0
        cfg = load_config(cls.Config, args.config, args.overrides, world_size=world_size_from_env())
        from core.distributed import init_distributed

        dist = init_distributed()
        trainer = cls(cfg, dist=dist, resume=args.resume)
        try:
            trainer.run()
        finally:
            trainer.close()
        return 0

    @classmethod
    def dry_run(cls, cfg: Any) -> None:
        """Print the resolved config, the model sizes and the dataset's first shard."""
        import yaml

        print("# resolved config")
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
        missing = [f"{k}={getattr(cfg, k)}" for k in dir(cfg) if k.endswith("_checkpoint_path")
                   and isinstance(getattr(cfg, k), str) and not os.path.isfile(getattr(cfg, k))]
        if missing:
            print("# missing files (download them before training): " + ", ".join(sorted(missing)))
        print("# models")
        for name, (kind, version) in cls.model_layout(cfg).items():
            try:
                from modules.registry import build_model

                n = count_parameters(build_model(kind, version, device="meta"))
                print(f"{name}: {kind} {version}: {n:,} parameters ({human_count(n)})")
            except Exception as exc:  # noqa: BLE001 - a dry run reports, it does not fail here
                print(f"{name}: {kind} {version}: size unavailable ({exc})")
        print("# data")
        shards = _list_shards(cfg)
        if shards:
            print(f"shards: {len(shards)}; first: {shards[0]}")
        else:
            print(f"webdataset_path: {cfg.webdataset_path} (could not list shards)")
        ws = world_size_from_env()
        print(f"batch: global {cfg.batch_size} = world_size {ws} x grad_accum_steps {cfg.grad_accum_steps} "
              f"x per-rank {cfg.per_rank_batch(ws)}")
        cls.print_memory_estimate(cfg)

    @classmethod
    def print_memory_estimate(cls, cfg: Any) -> None:
        """The analytic GPU memory estimate of the configured run (core.memory): weights, grads,
        optimizer states and activations at the per-GPU batch and image size, with and without
        gradient checkpointing. Fake tensors only: no weights are needed, nothing is allocated."""
        from core.memory import estimate_memory, format_estimate

        try:
            est = estimate_memory(cfg, kind=cls.model_kind or None)
        except Exception as exc:  # noqa: BLE001 - a dry run reports, it does not fail here
            print(f"# memory estimate unavailable ({type(exc).__name__}: {exc})")
            return
        print(format_estimate(est))

    @classmethod
    def model_layout(cls, cfg: Any) -> dict[str, tuple[str, str]]:
        """``{name: (registry kind, model_version)}`` of the models a dry run reports."""
        return {"generator": (cls.model_kind, cfg.model_version)}

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------
    def __init__(self, cfg: Any, dist: Any = None, resume: str = "auto") -> None:
        if dist is None:
            from core.distributed import init_distributed

            dist = init_distributed()
        self.cfg = cfg
        self.dist = dist
        self.device: torch.device = dist.device
        self.is_main: bool = dist.is_main
        self.resume_mode = resume
        self.run_dir = Path(cfg.checkpoint_path) / cfg.experiment_id
        self.output_dir = Path(cfg.output_path) / cfg.experiment_id
        self.step = 0                  # completed optimizer updates
        self.last_saved_step = 0       # step of the newest checkpoint (backups: boundary crossed since)
        self.backup_in_last_save = False
        self.nonfinite_total = 0       # skipped updates (non-finite loss or gradient)
        self.nonfinite_in_a_row = 0
        self.ema_loss: Optional[float] = None
        self.wandb_run_id: Optional[str] = None
        self.ema = None
        self.logger = None
        self.pipeline = None
        self._stop_signal: Optional[str] = None
        self._pending_loss_weight: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._micro = (0, 0)           # (update step, micro-step) being computed
        self._preview_batch: Optional[dict] = None
        self._preview_generator: Optional[torch.Generator] = None  # seeded anew for every preview
        self._poison_steps = _env_steps(POISON_ENV)
        self._crash_in_save = _env_steps(CRASH_IN_SAVE_ENV)
        self.autocast_dtype = self._resolve_precision()

    # ------------------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------------------
    def build_models(self) -> None:
        """Load frozen parts and the trained network(s) as attributes (``self.generator``...)."""
        raise NotImplementedError

    def trained_modules(self) -> list[str]:
        """Attribute names of the modules that hold trainable parameters (wrapped by DDP/FSDP)."""
        return ["generator"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for name in self.trained_modules():
            params += [p for p in getattr(self, name).parameters() if p.requires_grad]
        return params

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that never train (set to eval and requires_grad_(False) by the core)."""
        return []

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-step: the batch-mean loss (before accumulation scaling) and metrics."""
        raise NotImplementedError

    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """Images for the preview grids: ``{name: (N,3,H,W) in [0,1]}``."""
        return {}

    def models_to_save(self) -> dict[str, nn.Module]:
        """``{file stem: module}`` saved as ``<stem>.safetensors`` (official key layout)."""
        return {"generator": self.unwrapped("generator")}

    def load_saved_models(self, paths: dict[str, str]) -> None:
        """Load the files written from ``models_to_save()`` when resuming (strict)."""
        from modules.loading import read_state_dict

        for stem, module in self.models_to_save().items():
            path = paths.get(f"{stem}.safetensors")
            if path is None:
                raise UserError(f"resume: {stem}.safetensors is missing from the checkpoint in {self.run_dir}")
            _load_strict(module, read_state_dict(path), path)

    def extra_state(self) -> dict[str, Any]:
        """Job-specific state objects saved with the checkpoint (``{file name: object}``)."""
        return {}

    def load_extra_state(self, paths: dict[str, str]) -> None:
        """Restore what ``extra_state()`` saved (``paths``: file name -> path)."""

    # ------------------------------------------------------------------------------------------
    # Helpers for the hooks
    # ------------------------------------------------------------------------------------------
    def unwrapped(self, name: str) -> nn.Module:
        """The plain module behind a DDP wrapper (FSDP2 modules are their own module)."""
        module = getattr(self, name)
        return getattr(module, "module", module) if isinstance(module, nn.parallel.DistributedDataParallel) else module

    def sample_generators(self, n_local: int) -> list[torch.Generator]:
        """One CPU generator per sample of this rank's micro-batch, keyed by the GLOBAL sample index
        (rank * n_local + i) and the (update step, micro-step), so draws do not depend on the
        world size and repeat on resume."""
        step, micro = self._micro
        base = self.dist.rank * n_local
        return [torch.Generator().manual_seed(derive_seed(self.cfg.seed, "sample", step, micro, base + i))
                for i in range(n_local)]

    def batch_generator(self, purpose: str = "batch") -> torch.Generator:
        """A CPU generator shared by all ranks for one draw per (global) batch."""
        step, micro = self._micro
        return torch.Generator().manual_seed(derive_seed(self.cfg.seed, purpose, step, micro))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the trained network's forward (bf16 on capable GPUs, nothing on CPU)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def model_dtype(self) -> torch.dtype:
        return getattr(torch, self.cfg.dtype) if self.cfg.dtype else torch.float32

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Dtype of the frozen networks: ``frozen_dtype``, or bf16 on a bf16-capable GPU (half the
        memory of the encoders and of a frozen Stage C), float32 elsewhere (CPU: exact, fast)."""
        name = getattr(self.cfg, "frozen_dtype", None)
        if name:
            return getattr(torch, name)
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def to_frozen_dtype(self, module: nn.Module) -> nn.Module:
        """Cast a frozen network to :attr:`frozen_dtype`; floating inputs of its forward are cast
        to match (callers keep passing float32 images/latents and ``.float()`` the outputs)."""
        dtype = self.frozen_dtype
        module.to(dtype)
        if dtype == torch.float32:
            return module

        def cast_inputs(_mod: nn.Module, args: tuple) -> tuple:
            return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

        module.register_forward_pre_hook(cast_inputs)
        return module

    def load_generator(self) -> nn.Module:
        """The trained network: ``generator_checkpoint_path`` loaded strictly, or a fresh init ONLY
        when the key is null/absent (logged loudly)."""
        cfg = self.cfg
        if cfg.generator_checkpoint_path is None:
            log.warning("=" * 78)
            log.warning("generator_checkpoint_path is not set: training %s %s FROM SCRATCH (random init)",
                        self.model_kind, cfg.model_version)
            log.warning("=" * 78)
            from modules.registry import build_model

            # Seeded init: every rank (and every rerun) starts from the same weights.
            torch.manual_seed(derive_seed(cfg.seed, "init", self.model_kind))
            return build_model(self.model_kind, cfg.model_version, dtype=self.model_dtype)
        from modules.loading import load_model

        model = load_model(self.model_kind, cfg.model_version, cfg.generator_checkpoint_path,
                           dtype=self.model_dtype, device="cpu", strict=True)
        log.info("loaded %s %s from %s", self.model_kind, cfg.model_version, cfg.generator_checkpoint_path)
        return model

    def diffusion_loss(self, gdf: Any, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       x0: torch.Tensor, generators: list[torch.Generator],
                       epsilon: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusion loss of training.md §3.3 with per-sample random draws.

        Returns ``(loss, per-sample raw losses)``. The adaptive loss weight (if any) is updated by
        the loop only when the step's loss is finite (gathered over ranks).
        """
        parts = []
        with torch.no_grad():
            for i, g in enumerate(generators):
                eps_i = None if epsilon is None else epsilon[i:i + 1]
                parts.append(gdf.diffuse(x0[i:i + 1], shift=1, loss_shift=1, epsilon=eps_i, generator=g))
            noised, _eps, target, log_snr, noise_cond, loss_weight = (torch.cat(t) for t in zip(*parts))
        with self.autocast():
            pred = model(noised, noise_cond)
        per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight.float().view(-1)).mean()
        if _has_buckets(gdf.loss_weight):
            self._pending_loss_weight = (log_snr.detach(), per_sample.detach())
        return loss, per_sample.detach()

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------
    def _resolve_precision(self) -> Optional[torch.dtype]:
        p = self.cfg.precision
        if self.device.type != "cuda":
            if p in ("bf16", "fp16"):
                log.warning("precision %s requested but running on %s: training in fp32", p, self.device)
            return None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(self.cfg.allow_tf32)
            torch.backends.cudnn.allow_tf32 = bool(self.cfg.allow_tf32)
        if p == "fp32":
            return None
        if p == "fp16":
            return torch.float16
        if p == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError("precision 'bf16' requested but this GPU does not support bfloat16; use precision: fp32")
        if p == "auto" and not torch.cuda.is_bf16_supported():
            log.warning("this GPU does not support bfloat16: training in fp32 (slow)")
            return None
        return torch.bfloat16

    def _check_output_folders(self) -> None:
        for what, folder in (("checkpoint_path", self.run_dir), ("output_path", self.output_dir)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write_test_{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise UserError(f"config key '{what}': cannot write to {folder} ({exc.strerror or exc}); "
                                f"choose a writable folder") from None

    def setup(self) -> None:
        """Everything before the first step, in order: folders, models, resume, wrapping,
        optimizer, data, logger, signals."""
        cfg = self.cfg
        if self.is_main:
            self._check_output_folders()
        self._barrier()
        from core.checkpoint import CheckpointManager

        self.ckpt = CheckpointManager(str(self.run_dir), keep_last=cfg.keep_last, is_main=self.is_main)
        resume_paths = self._find_resume()
        # Data first: a missing or empty dataset fails in seconds, before any model is loaded.
        self._build_data(self._data_state(resume_paths) if resume_paths is not None else None)

        self.build_models()
        for module in self.frozen_modules():
            module.eval().requires_grad_(False)
        for name in self.trained_modules():
            module = getattr(self, name)
            if cfg.generator_dropout is not None:
                for m in module.modules():
                    if isinstance(m, nn.Dropout):
                        m.p = float(cfg.generator_dropout)
                    elif isinstance(m, nn.MultiheadAttention):  # attention-weight dropout
                        m.dropout = float(cfg.generator_dropout)
            if cfg.gradient_checkpointing and hasattr(module, "set_gradient_checkpointing"):
                module.set_gradient_checkpointing(True)
            module.to(self.device).train()

        if resume_paths is not None:
            self.load_saved_models(resume_paths)

        if cfg.ema_start_iters is not None:
            from core.ema import EMA

            self.ema = EMA(self.unwrapped(self.trained_modules()[0]), cfg)
            ema_file = (resume_paths or {}).get(f"{self.ema_file_stem()}.safetensors")
            if ema_file:
                from modules.loading import read_state_dict

                _load_strict(self.ema.module, read_state_dict(ema_file), ema_file)

        self._wrap_trained_modules()
        params = self.trainable_parameters()
        if not params:
            raise UserError(f"{type(self).__name__}: nothing to train (no parameter requires grad)")
        from core.optim import build_optimizer, build_warmup_scheduler

        self.optimizer = build_optimizer(params, cfg.lr, cfg)
        self.scheduler = build_warmup_scheduler(self.optimizer, cfg.warmup_updates)

        if resume_paths is not None:
            self._load_training_state(resume_paths)

        if self.is_main:
            save_config(cfg, str(self.run_dir / "config.yaml"))
        from core.logging import RunLogger

        self.logger = RunLogger(str(self.run_dir), cfg, self.is_main, total_steps=cfg.updates,
                                wandb_project=cfg.wandb_project, wandb_entity=cfg.wandb_entity,
                                run_id=self.wandb_run_id, start_step=self.step,
                                resume_step=self.step if resume_paths is not None else None,
                                preview_dir=str(self.output_dir))
        self.wandb_run_id = getattr(self.logger, "run_id", None) or self.wandb_run_id
        self._install_signal_handlers()

    def ema_file_stem(self) -> str:
        return f"{next(iter(self.models_to_save()))}_ema"

    def _wrap_trained_modules(self) -> None:
        from core.distributed import wrap_model

        mode = "none"
        if self.dist.world_size > 1:
            mode = "fsdp" if self.cfg.use_fsdp else "ddp"
        elif self.cfg.use_fsdp:
            log.info("use_fsdp is set but there is one process: training without sharding")
        for name in self.trained_modules():
            module = getattr(self, name).to(self.device)
            if self.cfg.compile:  # in place: state_dict keys stay the official ones
                module.compile()
            if mode != "none":
                blocks = tuple({type(m) for m in module.modules() if type(m).__name__ in self.fsdp_block_classes})
                module = wrap_model(module, self.dist, mode, block_types=blocks, param_dtype=self.autocast_dtype,
                                    reduce_dtype=torch.float32 if self.autocast_dtype else None)
            setattr(self, name, module)

    def build_pipeline(self, batch_size: int, state: Optional[dict]) -> Any:
        """The training batches of this rank (hook: Stage C jobs read an encoder cache instead)."""
        from core.data import build_pipeline

        return build_pipeline(self.cfg, batch_size=batch_size, rank=self.dist.rank,
                              world_size=self.dist.world_size, seed=self.cfg.seed,
                              num_workers=self.cfg.num_workers, state=state)

    def _build_data(self, state: Optional[dict]) -> None:
        self.pipeline = self.build_pipeline(self.cfg.per_rank_batch(self.dist.world_size), state)
        self._data_iter = iter(self.pipeline)
        self._prefetched: Optional[dict] = next(self._data_iter)  # fails early on an empty dataset

    def _next_batch(self) -> dict:
        if self._prefetched is not None:
            batch, self._prefetched = self._prefetched, None
        else:
            batch = next(self._data_iter)
        if self._preview_batch is None:
            # images + captions, or a cached batch's latents + embeddings: the first samples of each
            keep = min(self.cfg.num_preview_images, len(batch["captions"]))
            self._preview_batch = {k: v[:keep].clone() if isinstance(v, torch.Tensor) else list(v[:keep])
                                   for k, v in batch.items() if isinstance(v, (torch.Tensor, list))}
        if self._micro[0] in self._poison_steps:
            key = "images" if "images" in batch else "latents"
            batch = dict(batch, **{key: torch.full_like(batch[key], float("nan"))})
        return batch

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.setup()
        self.train()

    def train(self) -> None:
        """batch -> loss -> backward (accumulated) -> clip -> step -> EMA -> log -> preview -> save."""
        cfg = self.cfg
        accum = cfg.grad_accum_steps
        per_update_images = cfg.batch_size
        if self.step >= cfg.updates:
            log.info("nothing to do: the run already reached %d of %d updates", self.step, cfg.updates)
            return
        log.info("training %s from update %d to %d (%d process(es), batch %d = %d x %d x %d)",
                 type(self).__name__, self.step, cfg.updates, self.dist.world_size, cfg.batch_size,
                 self.dist.world_size, accum, cfg.per_rank_batch(self.dist.world_size))
        while self.step < cfg.updates:
            step = self.step + 1
            started = time.perf_counter()
            losses, metrics, finite = [], {}, True
            for micro in range(accum):
                self._micro = (step, micro)
                torch.manual_seed(derive_seed(cfg.seed, "module-rng", self.dist.rank, step, micro))
                batch = self._next_batch()
                sync = micro == accum - 1
                with self._no_sync(not sync):
                    loss, metrics = self.compute_loss(batch)
                    ok = self._all_finite(loss)
                    if ok and finite:
                        self._commit_loss_weight()
                        (loss / accum).backward()
                    finite = finite and ok
                    self._pending_loss_weight = None
                losses.append(float(loss.detach()))
            grad_norm = float("nan")
            if finite:
                grad_norm = self._clip_gradients()
                finite = math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(step)
                self.nonfinite_in_a_row = 0
            else:
                self._skip_update(step, losses, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step

            loss_value = self._global_mean(sum(losses) / len(losses))
            if math.isfinite(loss_value):
                self.ema_loss = loss_value if self.ema_loss is None else 0.99 * self.ema_loss + 0.01 * loss_value
            elapsed = time.perf_counter() - started
            self._log_step(step, loss_value, grad_norm, metrics, elapsed, per_update_images)

            stop = self._stop_requested()
            if self._is_preview_step(step):
                self._run_preview(step)
            if step % cfg.save_every == 0 or step == cfg.updates or stop:
                self.save_checkpoint(step)
            if stop:
                log.warning("received %s: saved the checkpoint of update %d and stopped; run the same command "
                            "again to resume", stop, step)
                return
        log.info("training finished at update %d; checkpoint in %s", self.step, self.run_dir)

    # -- loop pieces -------------------------------------------------------------------------
    def _global_mean(self, value: float) -> float:
        """Mean of a per-rank number over all ranks (logging: the global loss, not rank 0's)."""
        if self.dist.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.dist.world_size

    def _no_sync(self, skip_sync: bool) -> contextlib.AbstractContextManager:
        """DDP: no gradient all-reduce on the micro-steps before the last one."""
        if not skip_sync:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for name in self.trained_modules():
            module = getattr(self, name)
            if isinstance(module, nn.parallel.DistributedDataParallel):
                stack.enter_context(module.no_sync())
            elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
                module.set_requires_gradient_sync(False)
                stack.callback(module.set_requires_gradient_sync, True)
        return stack

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.device)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() == 0.0)

    def _commit_loss_weight(self) -> None:
        """Update the AdaptiveLossWeight buckets with this micro-step's (gathered) raw losses."""
        if self._pending_loss_weight is None:
            return
        log_snr, losses = self._pending_loss_weight
        if self.dist.world_size > 1:
            log_snr, losses = _all_gather_cat(log_snr), _all_gather_cat(losses)
        self.loss_weight_object().update_buckets(log_snr.float().cpu(), losses.float().cpu())

    def loss_weight_object(self) -> Any:
        return self.gdf.loss_weight  # type: ignore[attr-defined]

    def _clip_gradients(self) -> float:
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")  # None/0: measure only
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _skip_update(self, step: int, losses: list[float], grad_norm: float) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        what = "loss" if not all(math.isfinite(x) for x in losses) else f"gradient norm ({grad_norm})"
        log.warning("update %d skipped: non-finite %s (no weight, EMA or optimizer change); %d skipped so far",
                    step, what, self.nonfinite_total)
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise UserError(f"{self.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient "
                            f"(last at update {step}); lower lr, check the data, or resume from an earlier "
                            f"checkpoint in {self.run_dir}")

    def _log_step(self, step: int, loss: float, grad_norm: float, metrics: dict, elapsed: float,
                  images: int) -> None:
        record = {"loss": loss, "ema_loss": self.ema_loss, "grad_norm": grad_norm,
                  "lr": self.optimizer.param_groups[0]["lr"], "nonfinite_skipped": self.nonfinite_total,
                  "step_time_s": elapsed, "images_per_s": images / max(elapsed, 1e-9)}
        for k, v in metrics.items():
            record[k] = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else v
        if step % self.cfg.log_every == 0 or step in (1, self.cfg.updates) or not math.isfinite(grad_norm):
            self.logger.log(step, record)
        else:
            self.logger.progress(step, loss=loss, images_per_s=record["images_per_s"])

    def _is_preview_step(self, step: int) -> bool:
        every = self.cfg.preview_every if self.cfg.preview_every is not None else self.cfg.save_every
        return bool(every) and (step % every == 0 or step == self.cfg.updates)

    def _run_preview(self, step: int) -> None:
        if self._preview_batch is None:
            return
        modules = [getattr(self, n) for n in self.trained_modules()]
        for m in modules:
            m.eval()
        try:
            with torch.no_grad():
                gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "preview"))
                self._preview_generator = gen
                grids = self.preview(self._preview_batch)
        finally:
            for m in modules:
                m.train()
        if self.is_main:
            for name, images in grids.items():
                images = images.detach().float().clamp(0, 1).cpu()
                if images.shape[-1] < 128:  # tiny previews (CPU runs): enlarge so a person can see them
                    factor = -(-128 // images.shape[-1])
                    images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
                self.logger.log_images(step, name, images, nrow=min(len(images), self.cfg.num_preview_images))

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def _gather_models(self) -> dict[str, dict[str, torch.Tensor]]:
        """Full (unsharded) CPU state dicts of the saved models; collective under FSDP."""
        out = {}
        models = dict(self.models_to_save())
        if self.ema is not None:
            models[self.ema_file_stem()] = self.ema.module
        for stem, module in models.items():
            if any(hasattr(p, "full_tensor") for p in module.parameters()):
                from core.distributed import full_state_dict

                out[stem] = full_state_dict(module)  # collective; rank 0 gets the CPU tensors
            elif self.is_main:
                out[stem] = _full_state_dict(module)
        return out

    def _optimizer_state(self) -> Any:
        if self.dist.world_size > 1 and self.cfg.use_fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            modules = tuple(getattr(self, n) for n in self.trained_modules())
            return get_optimizer_state_dict(modules if len(modules) > 1 else modules[0], self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict() if self.is_main else None

    def _data_states(self) -> list:
        state = self.pipeline.state_dict() if self.pipeline is not None else None
        if self.dist.world_size > 1:
            gathered: list = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, state)
            return gathered
        return [state]

    def save_checkpoint(self, step: int) -> None:
        """Model files (official layout) + training state; atomic, `latest` written last."""
        from core.checkpoint import capture_rng_state
        from modules.loading import save_safetensors

        self.backup_in_last_save = self.backup_due(step)
        models = self._gather_models()
        optimizer_state = self._optimizer_state()
        data_states = self._data_states()
        if self.is_main:
            crash = step in self._crash_in_save
            files: dict[str, Any] = {}
            for stem, sd in models.items():
                files[f"{stem}.safetensors"] = _safetensors_writer(sd, save_safetensors,
                                                                   crash=crash and stem == "generator")
            state: dict[str, Any] = {
                "optimizer.pt": optimizer_state,
                "scheduler.pt": self.scheduler.state_dict(),
                "rng.pt": capture_rng_state(),
                "data.json": {"world_size": self.dist.world_size, "ranks": data_states},
                "trainer.json": self._trainer_state(step),
            }
            lw = self._loss_weight_state()
            if lw is not None:
                state["loss_weight.pt"] = lw
            state.update(self.extra_state())
            self.ckpt.save(step, files, state)
            if self.backup_in_last_save:
                self.ckpt.backup(step, list(files))
            save_config(self.cfg, str(self.run_dir / "config.yaml"))
            self.logger.plot_loss(str(self.run_dir / "loss.png"))
            log.info("checkpoint of update %d written to %s", step, self.run_dir)
        self.last_saved_step = step
        self._barrier()

    def backup_due(self, step: int) -> bool:
        """True when a ``backup_every`` boundary was crossed since the previous save. The reference
        backed up only when ``step % backup_every == 0`` fell on a save step, so save_every 3 with
        backup_every 4 never backed up until step 12 (reference-behaviour.md §13 item 12)."""
        every = self.cfg.backup_every
        return bool(every) and step // every > self.last_saved_step // every

    def _trainer_state(self, step: int) -> dict:
        return {"step": step, "model_kind": self.model_kind, "model_version": self.cfg.model_version,
                "experiment_id": self.cfg.experiment_id, "world_size": self.dist.world_size,
                "nonfinite_total": self.nonfinite_total, "ema_loss": self.ema_loss,
                "wandb_run_id": self.wandb_run_id, "config": config_to_dict(self.cfg)}

    def _loss_weight_state(self) -> Optional[dict]:
        gdf = getattr(self, "gdf", None)
        if gdf is None or not _has_buckets(gdf.loss_weight):
            return None
        return gdf.loss_weight.state_dict()

    def _find_resume(self) -> Optional[dict[str, str]]:
        """Paths of the checkpoint to resume from, or None (fresh run)."""
        mode = self.resume_mode
        if mode == "never":
            if self.ckpt.latest_step() is not None:
                log.warning("--resume never: ignoring the existing checkpoints in %s (they will be overwritten)",
                            self.run_dir)
            return None
        if mode == "auto":
            step = self.ckpt.latest_step()
            if step is None:
                return None
            paths = self.ckpt.load(step)
            where = self.run_dir
        else:
            from core.checkpoint import CheckpointManager

            target = Path(mode)
            if (target / "trainer.json").is_file():
                paths = {p.name: str(p) for p in target.iterdir() if p.is_file()}
                where = target
            elif target.is_dir():
                other = CheckpointManager(str(target), keep_last=10**9)
                step = other.latest_step()
                if step is None:
                    raise UserError(f"--resume {mode}: no complete checkpoint in that folder")
                paths = other.load(step)
                where = target
            else:
                raise UserError(f"--resume {mode}: not a run folder or a state/step_* folder")
        trainer = _read_json(paths.get("trainer.json"))
        saved_version = trainer.get("model_version")
        if saved_version is not None and saved_version != self.cfg.model_version:
            raise UserError(f"checkpoint in {where} was trained with model_version '{saved_version}' but the config "
                            f"says '{self.cfg.model_version}'; fix model_version or use another experiment_id")
        log.info("resuming from the checkpoint of update %s in %s", trainer.get("step"), where)
        if self.is_main:
            print(f"resuming from update {trainer.get('step')} ({where})", flush=True)
        return paths

    def _data_state(self, paths: dict[str, str]) -> Optional[dict]:
        data = _read_json(paths.get("data.json"))
        ranks = data.get("ranks") or []
        if data.get("world_size") != self.dist.world_size:
            if ranks:
                log.warning("the checkpoint was written with %s process(es), this run has %d: the data "
                            "position restarts (weights and optimizer resume exactly)",
                            data.get("world_size"), self.dist.world_size)
            return None
        return ranks[self.dist.rank] if self.dist.rank < len(ranks) else None

    def _load_training_state(self, paths: dict[str, str]) -> None:
        trainer = _read_json(paths.get("trainer.json"))
        self.step = int(trainer.get("step", 0))
        self.last_saved_step = self.step
        self.nonfinite_total = int(trainer.get("nonfinite_total", 0))
        self.ema_loss = trainer.get("ema_loss")
        self.wandb_run_id = trainer.get("wandb_run_id")
        if paths.get("optimizer.pt"):
            opt_state = torch.load(paths["optimizer.pt"], map_location="cpu", weights_only=False)
            groups = opt_state.get("param_groups") or [{}]
            by_name = bool(groups[0].get("params")) and isinstance(groups[0]["params"][0], str)
            fsdp = self.dist.world_size > 1 and self.cfg.use_fsdp
            if by_name != fsdp:
                saved, now = ("FSDP", "without FSDP") if by_name else ("without FSDP", "with FSDP")
                raise UserError(f"the checkpoint in {paths.get('_dir', self.run_dir)} was trained {saved} and this run "
                                f"is {now}; resume with the same use_fsdp setting (and >1 process for FSDP)")
            if fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                modules = tuple(getattr(self, n) for n in self.trained_modules())
                set_optimizer_state_dict(modules if len(modules) > 1 else modules[0], self.optimizer, opt_state,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(opt_state)
        if paths.get("scheduler.pt"):
            self.scheduler.load_state_dict(torch.load(paths["scheduler.pt"], map_location="cpu", weights_only=False))
        if paths.get("loss_weight.pt") and getattr(self, "gdf", None) is not None:
            self.gdf.loss_weight.load_state_dict(
                torch.load(paths["loss_weight.pt"], map_location="cpu", weights_only=False))
        if paths.get("rng.pt"):
            from core.checkpoint import restore_rng_state

            restore_rng_state(torch.load(paths["rng.pt"], map_location="cpu", weights_only=False))
        self.load_extra_state(paths)

    # ------------------------------------------------------------------------------------------
    # Signals, distributed helpers, teardown
    # ------------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name
            log.warning("%s received: finishing the current update, then saving", self._stop_signal)

        self._old_handlers = {}
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name):
                try:
                    self._old_handlers[name] = signal.signal(getattr(signal, name), handler)
                except ValueError:  # not the main thread (e.g. a notebook worker)
                    pass

    def _stop_requested(self) -> Optional[str]:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.device)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            return self._stop_signal or "a stop signal (on another rank)"
        return None

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            from core.distributed import barrier

            barrier()

    def close(self) -> None:
        for name, previous in getattr(self, "_old_handlers", {}).items():
            signal.signal(getattr(signal, name), previous)
        self._old_handlers = {}
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        close = getattr(self.pipeline, "close", None)
        if callable(close):
            close()
        from core.distributed import cleanup

        cleanup()


# ----------------------------------------------------------------------------------------------
# Module-level helpers
# ----------------------------------------------------------------------------------------------
def _setup_python_logging() -> None:
    from core.logging import setup_logging

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    setup_logging(is_main=rank == 0)


def _has_buckets(loss_weight: Any) -> bool:
    return hasattr(loss_weight, "update_buckets")


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    world = torch.distributed.get_world_size()
    out = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(out, t.contiguous())
    return torch.cat(out)


def _full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every entry; DTensor (FSDP2) entries are gathered (collective)."""
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().to("cpu", copy=True)
    return out


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise UserError(f"{path} does not match the configured architecture (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); check model_version")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _safetensors_writer(sd: dict[str, torch.Tensor], save: Callable, crash: bool = False) -> Callable[[str], None]:
    def write(path: str) -> None:
        if crash:  # test hook: die like kill -9 in the middle of the write
            with open(path, "wb") as fh:
                fh.write(b"partial")
                fh.flush()
                os.fsync(fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        save(sd, path)

    return write


def _read_json(path: Optional[str]) -> dict:
    if not path:
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _list_shards(cfg: Any) -> list[str]:
    from core.config import is_placeholder_path

    entries = cfg.webdataset_path if isinstance(cfg.webdataset_path, list) else [cfg.webdataset_path]
    entries = [e for e in entries if isinstance(e, str) and not is_placeholder_path(e)]
    if not entries:  # the official configs' s3://path/to/... placeholders: nothing to list
        return []
    try:
        from core.data import expand_sources

        return list(expand_sources(entries))
    except Exception:  # noqa: BLE001 - the dry run falls back to printing the configured path
        return []


__all__ = ["TrainingCore", "TrainingConfig", "derive_seed", "count_parameters", "human_count"]
