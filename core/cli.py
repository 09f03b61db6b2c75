"""The command line of every training script: ``python3 train/<job>.py CONFIG [options]``.

``--set KEY=VALUE`` overrides (YAML values), ``--validate-only`` checks a config (placeholder paths
allowed), ``--dry-run`` runs the same checks, then prints the resolved config, what the job would
build, the data and batch split and the per-rank memory estimate, then exits; ``--resume
auto|never|PATH``. Both check the batch split against the launcher's world size
(``WORLD_SIZE`` / ``SLURM_NTASKS``, :func:`core.distributed.world_size_from_env`), as the run does. A user error exits with
status 2 and one line (``core.errors.run_cli``); a finished or preempted run exits 0.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from core.config import config_to_dict, is_placeholder_path, load_config, parse_cli
from core.distributed import world_size_from_env

__all__ = ["main", "dry_run", "setup_python_logging"]


def setup_python_logging() -> None:
    """Log lines from rank 0 only (the others would repeat them)."""
    from core.logging import setup_logging

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    setup_logging(is_main=rank == 0)


def main(job: type, argv: Optional[list[str]] = None) -> int:
    """Run the job class ``job`` (a TrainingCore subclass) as its script's command line."""
    args = parse_cli(argv, prog=Path(sys.argv[0]).name, description=job.description)
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
            print(f"config OK: {args.config} ({job.__name__}, world size {world_size}: "
                  f"per-rank micro-batch {cfg.per_rank_batch(world_size)})")
        return 0
    cfg = load_config(job.Config, args.config, args.overrides, world_size=world_size)
    from core.distributed import init_distributed

    trainer = job(cfg, dist=init_distributed(), resume=args.resume)
    try:
        trainer.run()
    finally:
        trainer.close()
    return 0


def dry_run(job: type, cfg: Any, world_size: Optional[int] = None, simulate: bool = False) -> None:
    """Print the resolved config, missing files, the job's description of what it builds, the
    dataset's first shard, the batch split and the per-rank memory estimate of the job's spec,
    for ``world_size`` ranks (default: the launcher's environment)."""
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
    print("# data")
    shards = _list_shards(cfg)
    if shards:
        print(f"shards: {len(shards)}; first: {shards[0]}")
    else:
        print(f"webdataset_path: {cfg.webdataset_path} (could not list shards)")
    print(f"batch: global {cfg.batch_size} = world_size {ws} x grad_accum_steps {cfg.grad_accum_steps} "
          f"x per-rank {cfg.per_rank_batch(ws)}")
    est = _print_memory_estimate(job, cfg, ws)
    if simulate:
        _print_simulation(job, cfg, ws, est)


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
