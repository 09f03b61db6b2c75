"""The command line of every training script: ``python3 train/<job>.py CONFIG [options]``.

``--set KEY=VALUE`` overrides (YAML values), ``--validate-only`` runs every check of a run's start
that needs no model (:func:`check_inputs`: input files and folders, CLIP folders, the data sets
listed and their first shard opened; placeholders, official files not downloaded yet and hub ids
are allowed and listed), ``--dry-run`` runs the same checks, then prints the resolved config, what the job would
build, the data and batch split and the per-rank memory estimate, then exits; ``--resume
auto|never|PATH``. Both check the batch split against the launcher's world size
(``WORLD_SIZE`` / ``SLURM_NTASKS``, :func:`core.distributed.world_size_from_env`), as the run does. A user error exits with
status 2 and one line (``core.errors.run_cli``); a finished or preempted run exits 0. A CPU run
picks its threading first (core/cpu_threads.py: started from its own command line without
``OMP_WAIT_POLICY``, it restarts itself once with the passive wait policy).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from core.config import config_to_dict, is_placeholder_path, load_config, parse_cli
from core.cpu_threads import configure_cpu_threads, reexec_with_passive_wait
from core.distributed import world_size_from_env

__all__ = ["main", "dry_run", "check_inputs", "setup_python_logging"]


def setup_python_logging() -> None:
    """Log lines from rank 0 only (the others would repeat them)."""
    from core.logging import setup_logging

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    setup_logging(is_main=rank == 0)


def main(job: type, argv: Optional[list[str]] = None) -> int:
    """Run the job class ``job`` (a TrainingCore subclass) as its script's command line."""
    args = parse_cli(argv, prog=Path(sys.argv[0]).name, description=job.description)
    gpu = _has_gpu()
    own_command_line = argv is None or list(argv) == sys.argv[1:]
    if own_command_line and not (args.validate_only or args.dry_run):
        # the process's own command line (not a call from Python): the wait policy needs a fresh start
        reexec_with_passive_wait(gpu)
    setup_python_logging()
    world_size = world_size_from_env()
    if args.simulate and not args.dry_run:
        from core.errors import UserError

        raise UserError("--simulate needs --dry-run (it replaces nothing of a run: it prints a simulated peak)")
    if args.validate_only or args.dry_run:
        # One validation for both, the run's own (batch split over the launcher's world size
        # included), lenient only about files that are not downloaded yet.
        cfg = load_config(job.Config, args.config, args.overrides, validate_only=True, world_size=world_size)
        if args.dry_run:  # says which files are missing
            dry_run(job, cfg, world_size, simulate=args.simulate)
        else:
            pending = check_inputs(job, cfg)  # what the run's start checks, so "config OK" means it starts
            print(f"config OK: {args.config} ({job.__name__}, world size {world_size}: "
                  f"per-rank micro-batch {cfg.per_rank_batch(world_size)})")
            if pending:
                print("not checked (placeholders, official files not downloaded yet, hub ids): " + ", ".join(pending))
        return 0
    cfg = load_config(job.Config, args.config, args.overrides, world_size=world_size)
    configure_cpu_threads(gpu, choose=own_command_line)
    from core.discovery import discover_data

    discover_data(cfg)  # the data first (every rank): a missing or empty dataset fails before any folder exists
    from core.distributed import init_distributed

    trainer = job(cfg, dist=init_distributed(), resume=args.resume)
    try:
        trainer.run()
    finally:
        trainer.close()
    return 0


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def check_inputs(job: type, cfg: Any) -> list[str]:
    """The input checks of a run's start, without loading a model: every file and folder the config
    validators named (``RunConfig.check_file``), the CLIP folders, and every data set of
    ``job.data_sources`` (required, schemes, listing, the first shard opened). Raises the run's
    one-line error; returns ``key=value`` of what cannot be checked yet: placeholders
    (``/path/to/...``), official files not downloaded yet, hub ids."""
    from core.config import input_path_problem
    from core.errors import UserError
    from fileio.state_dicts import is_official_file

    pending: list[str] = []
    for key, (kind, fix) in sorted(cfg.input_paths.items()):
        path = getattr(cfg, key)
        problem = input_path_problem(key, path, kind, fix)
        if problem is None:
            _check_weights_file(key, path)
            continue
        if is_placeholder_path(path) or (kind != "folder" and is_official_file(path)):
            pending.append(f"{key}={path}")
            continue
        raise UserError(problem)
    for key in sorted(k for k in vars(cfg) if k.endswith("_model_name")):
        name = getattr(cfg, key)
        if not isinstance(name, str) or os.path.isdir(os.path.expanduser(name)) or is_placeholder_path(name):
            continue
        from modules.conditioning import looks_like_hub_id

        if os.path.exists(os.path.expanduser(name)) or not looks_like_hub_id(name):
            raise UserError(f"config key '{key}': folder not found: {name} (a folder written by save_pretrained, "
                            f"or a Hugging Face hub id)")
        pending.append(f"{key}={name}")
    for key, value in job.data_sources(cfg).items():
        pending += _check_source(key, value)
    return pending


def _check_weights_file(key: str, path: str) -> None:
    """A weights file as the run's loader opens it: a supported extension and, for safetensors, a
    readable header (no tensor data is read; torch files are only read by the run)."""
    if not (key.endswith("_checkpoint_path") or key.endswith("_model_path")) or not os.path.isfile(path):
        return
    from core.errors import UserError
    from fileio.errors import CheckpointError
    from fileio.state_dicts import checkpoint_path, safetensors_shapes

    try:
        if checkpoint_path(path).suffix.lower() == ".safetensors":
            safetensors_shapes(path)
    except CheckpointError as exc:
        raise UserError(f"config key '{key}': {exc}") from None


def _check_source(key: str, value: Any) -> list[str]:
    """One data set of the run: its sources expanded as the run's pipeline does, the first shard
    opened; errors name ``key``. Placeholder entries are returned, not read."""
    from core.data import DataError
    from core.data.errors import for_key
    from core.data.sources import expand_named_sources, open_shard
    from core.errors import UserError

    if value is None:
        raise UserError(f"config key '{key}' is required: the images the run trains on (a folder of images, .tar "
                        f"shards, a .yml list, s3:// or http(s):// URLs)")
    entries = [value] if isinstance(value, str) else list(value)
    placeholders = [e for e in entries if is_placeholder_path(e)]
    real = [e for e in entries if not is_placeholder_path(e)]
    if real:
        try:
            urls = [u for u, _ in expand_named_sources(real)]
            _open_one(urls[:3])
        except DataError as exc:
            message = str(for_key(exc, key))
            raise DataError(message if message.startswith(key) else f"{key}: {message}") from None
    return [f"{key}={e}" for e in placeholders]


def _open_one(urls: list[str]) -> None:
    """Read the first tar header of the first of ``urls`` that opens and starts like a tar shard
    (the run skips missing and broken shards too); the last error when none does."""
    import tarfile

    from core.data import DataError
    from core.data.sources import open_shard

    error: Exception = DataError("no shard")
    for url in urls:
        try:
            with open_shard(url) as fh:
                block = fh.read(512)
            try:
                tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.EmptyHeaderError:
                error = DataError(f"{url}: an empty tar shard (no sample)")
                continue
            except tarfile.HeaderError:
                error = DataError(f"{url}: not a tar shard (its first {len(block)} bytes are no tar header)")
                continue
            return
        except DataError as exc:  # ShardMissing included
            error = exc
        except OSError as exc:
            error = DataError(f"cannot read {url}: {exc.strerror or exc}")
    raise error


def dry_run(job: type, cfg: Any, world_size: Optional[int] = None, simulate: bool = False) -> None:
    """Print the resolved config, missing files, the job's description of what it builds, the
    dataset's first shard, the batch split and the per-rank memory estimate of the job's spec,
    for ``world_size`` ranks (default: the launcher's environment); ``simulate``: also the peak of
    one simulated step (core/memsim.py) beside the estimate."""
    import yaml

    ws = world_size_from_env() if world_size is None else world_size
    print("# resolved config")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    missing = [f"{k}={getattr(cfg, k)}" for k in dir(cfg) if k.endswith("_checkpoint_path")
               and isinstance(getattr(cfg, k), str) and not os.path.isfile(getattr(cfg, k))]
    if missing:
        print("# missing files (download them before training): " + ", ".join(sorted(missing)))
    for line in job.describe(cfg):
        print(line)
    if hasattr(cfg, "lr_scheduler") and getattr(cfg, "training", True):
        from core.lr_schedule import schedule_lines

        for line in schedule_lines(cfg):
            print(line)
    print("# data")
    shards = _list_shards(cfg)
    if shards:
        print(f"shards: {len(shards)}; first: {shards[0]}")
    else:
        print(f"webdataset_path: {cfg.webdataset_path} (could not list shards)")
    print(f"batch: global {cfg.batch_size} = world_size {ws} x grad_accum_steps {cfg.grad_accum_steps} "
          f"x per-rank {cfg.per_rank_batch(ws)}")
    ws_est = _estimate_world_size(cfg, ws)  # without a launcher: the world size the batch is written for
    est = _print_memory_estimate(job, cfg, ws_est)
    if simulate:
        _print_simulation(job, cfg, ws_est, est)


#: images per GPU per micro-step above which a config with no launcher around it reads as written for many GPUs
WRITTEN_FOR_PER_GPU = 8


def _estimate_world_size(cfg: Any, world_size: int) -> int:
    """The world size to estimate memory for: the launcher's; without a launcher (a shell, world
    size 1) and a global batch that would put more than WRITTEN_FOR_PER_GPU images per micro-step
    on the one GPU, the smallest power-of-two world size the batch splits into at most that many
    per GPU (the official configs' batches of 256-1024 are written for many GPUs), said so."""
    if world_size != 1 or any(k in os.environ for k in ("WORLD_SIZE", "SLURM_NTASKS")):
        return world_size
    per_step = cfg.batch_size // max(1, cfg.grad_accum_steps)
    if per_step <= WRITTEN_FOR_PER_GPU:
        return world_size
    written_for = 1
    while per_step // written_for > WRITTEN_FOR_PER_GPU and per_step % (written_for * 2) == 0:
        written_for *= 2
    if written_for == 1:
        return world_size
    print(f"# the global batch {cfg.batch_size} is written for many GPUs: here (world size 1, no launcher) one GPU "
          f"would run {per_step} images per micro-step. The estimate below is PER GPU at world size {written_for} "
          f"({per_step // written_for} images per GPU per micro-step); launch the dry run with WORLD_SIZE=N "
          f"(torchrun/slurm) for your own split")
    return written_for


def _print_memory_estimate(job: type, cfg: Any, world_size: int) -> Optional[dict]:
    """The analytic per-rank GPU memory estimate of the job's memory spec (fake tensors only:
    nothing is loaded or allocated)."""
    from core.memory import estimate_memory, format_estimate

    try:
        spec = job.memory_spec(cfg, world_size)
        if spec is None:
            return None
        est = estimate_memory(spec)
    except Exception as exc:  # noqa: BLE001 - a dry run reports, it does not fail here
        print(f"# memory estimate unavailable ({type(exc).__name__}: {exc})")
        return None
    print(format_estimate(est))
    return est


def _print_simulation(job: type, cfg: Any, world_size: int, est: Optional[dict]) -> None:
    """The simulated peak of one step (core/memsim.py) beside the analytic estimate."""
    from core.memsim import GIB, format_result

    print("# simulated GPU step (core/memsim.py: fake tensors at full size, a CUDA GPU's decisions)")
    try:  # an optional hook of the job: memory_simulation(cfg, world_size) -> core.memsim.SimResult
        hook = getattr(job, "memory_simulation", None)
        sim = hook(cfg, world_size) if hook is not None else None
    except Exception as exc:  # noqa: BLE001 - a dry run reports, it does not fail here
        print(f"# simulation unavailable ({type(exc).__name__}: {exc})")
        return
    if sim is None:
        print("# simulation unavailable (this job has none)")
        return
    print(format_result(sim) + f"; {sim.seconds:.0f} s")
    if est is not None:
        key = "total_checkpointed" if est["configured_checkpointing"] else "total"
        print(f"{'simulated peak':<38}{sim.peak_bytes / GIB:>9.2f} GiB")
        print(f"{'analytic estimate (configured)':<38}{est[key] / GIB:>9.2f} GiB "
              f"({100 * (est[key] - sim.peak_bytes) / sim.peak_bytes:+.1f} %)")


def _list_shards(cfg: Any) -> list[str]:
    entries = cfg.webdataset_path if isinstance(cfg.webdataset_path, list) else [cfg.webdataset_path]
    entries = [e for e in entries if isinstance(e, str) and not is_placeholder_path(e)]
    if not entries:  # the official configs' s3://path/to/... placeholders: nothing to list
        return []
    try:
        from core.data import expand_sources

        return list(expand_sources(entries))
    except Exception:  # noqa: BLE001 - the dry run falls back to printing the configured path
        return []
