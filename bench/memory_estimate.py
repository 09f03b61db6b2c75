"""Print core.memory's per-rank estimate for an explicit run shape (the GPU rows of bench/README.md).

The run is described by the jobs' memory specs (train/memory_specs.py), fed a config holding the
command line's keys. ``--batch-size`` is the per-rank micro-batch; ``--world-size N`` runs N ranks
(global batch N x that), ``--fsdp`` shards them as ``use_fsdp: true`` does.

    python3 bench/memory_estimate.py --version 3.6B --mode lora --batch-size 4 --image-size 1024
    python3 bench/memory_estimate.py --version 3.6B --weight-dtype bfloat16 --optimizer adafactor
    python3 bench/memory_estimate.py --version 3.6B --world-size 8 --fsdp

For a training YAML use the trainer's ``--dry-run`` instead (same estimate, from the config).
"""
from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

from core.memory import MemorySpec, estimate_memory, format_estimate


def run_spec(a: argparse.Namespace) -> MemorySpec:
    """The job's memory spec for the command line's run shape (a config with just those keys)."""
    from train.memory_specs import controlnet_spec, lora_spec, stage_b_spec, stage_c_spec

    cfg = SimpleNamespace(model_version=a.version, batch_size=a.batch_size * a.world_size, image_size=a.image_size,
                          optimizer=a.optimizer, dtype=a.weight_dtype, frozen_dtype=a.frozen_dtype,
                          precision="auto", cache_path="<cache>" if a.cached else None, rank=a.lora_rank,
                          module_filters=[".attn"], grad_accum_steps=1, use_fsdp=a.fsdp)
    if a.mode == "lora":
        return lora_spec(cfg, a.world_size)
    if a.mode == "controlnet":
        return controlnet_spec(cfg, a.world_size)
    return (stage_b_spec if a.kind == "stage_b" else stage_c_spec)(cfg, a.world_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="stage_c", choices=["stage_c", "stage_b"])
    p.add_argument("--version", default="3.6B")
    p.add_argument("--mode", default="full", choices=["full", "lora", "controlnet"])
    p.add_argument("--batch-size", type=int, default=4, help="per-rank micro-batch")
    p.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the run")
    p.add_argument("--fsdp", action="store_true", help="shard over the ranks (use_fsdp: true)")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_fused", "adafactor", "adamw8bit"])
    p.add_argument("--weight-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--frozen-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--cached", action="store_true", help="conditions from a cache: no encoders loaded")
    p.add_argument("--json", action="store_true", help="also print the estimate as JSON")
    a = p.parse_args(argv)
    if a.kind == "stage_b" and a.mode != "full":
        p.error("--mode lora/controlnet train on Stage C (--kind stage_c)")
    if a.world_size < 1 or a.batch_size < 1:
        p.error("--world-size and --batch-size must be >= 1")
    est = estimate_memory(run_spec(a))
    print(format_estimate(est))
    if a.json:
        print(json.dumps(est, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
