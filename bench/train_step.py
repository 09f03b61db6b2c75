"""Training-step benchmark: median step time, images/s, peak memory (and MFU on GPU).

    python3 bench/train_step.py --config configs/training/tiny_c.yaml --steps 10 [--set k=v ...] \
        [--trainer c|b|c_lora|c_controlnet] [--warmup 2] [--out result.json]

Drives the trainer through its public entry points (``Config`` + ``TrainingCore.run`` with
``updates = warmup + steps``, checkpoints and previews pushed past the end) and reads the per-update
``step_time_s`` the loop itself logs to ``metrics.jsonl``: the figure is what training does, data
loading included. The first ``--warmup`` updates (allocator growth, lazy init, compile) are dropped.
Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; peak RSS of the process on CPU (so it
includes the Python/torch baseline and the models). MFU (GPU only): model FLOPs per update
(forward counted by ``torch.utils.flop_counter`` on fake tensors, x3 for forward + backward) /
step time / the card's peak dense bf16 FLOP/s (``--peak-tflops``, default from the device name).
Prints ONE summary line; ``--out`` writes the same figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.report import report

#: dense bf16 tensor-core peaks (TFLOP/s) by device-name substring
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40": 181.0, "4090": 165.0, "A10": 125.0}


def trainer_class(name: str | None, model_version: str) -> type:
    """The training script's class: explicit ``--trainer`` or Stage B/C from the model_version."""
    if name is None:
        name = "b" if model_version in ("3B", "700M") else "c"
    module, cls = {"c": ("train.train_c", "StageCTrainer"), "b": ("train.train_b", "StageBTrainer"),
                   "c_lora": ("train.train_c_lora", "StageCLoraTrainer"),
                   "c_controlnet": ("train.train_c_controlnet", "StageCControlNetTrainer")}[name]
    import importlib

    return getattr(importlib.import_module(module), cls)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS (process)"


#: trainer class name -> the train/memory_specs.py function describing its run
MEMORY_SPECS = {"StageCTrainer": "stage_c_spec", "StageBTrainer": "stage_b_spec",
                "StageCLoraTrainer": "lora_spec", "StageCControlNetTrainer": "controlnet_spec"}


def forward_flops(cfg, trainer_name: str) -> float:
    """Training FLOPs per update of the trained network: 3 x the forward at the per-rank batch
    (the forward of the trainer's memory spec, on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from train import memory_specs

    spec = getattr(memory_specs, MEMORY_SPECS[trainer_name])(cfg)
    with FakeTensorMode():
        networks = spec.build()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            spec.forward(networks)
    return 3.0 * counter.get_total_flops() * cfg.grad_accum_steps


def bench(config: str, steps: int, overrides: list[str], trainer: str | None = None, warmup: int = 1,
          peak_tflops: float | None = None) -> dict:
    from core.config import load_config
    from core.distributed import init_distributed

    cls = trainer_class(trainer, _model_version(config, overrides))
    work = tempfile.mkdtemp(prefix="bench_train_step_")
    total = warmup + steps
    sets = list(overrides) + [f"checkpoint_path={work}/ck", f"output_path={work}/out", f"updates={total}",
                              f"save_every={total + 1}", "preview_every=0", "log_every=1",
                              "experiment_id=bench"]
    cfg = load_config(cls.Config, config, sets)
    dist = init_distributed()
    job = cls(cfg, dist=dist, resume="never")
    try:
        job.run()
    finally:
        job.close()
    rows = [json.loads(x) for x in (Path(work) / "ck" / "bench" / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][warmup:]
    median = statistics.median(times)
    images = cfg.batch_size
    peak, how = peak_memory_bytes(dist.device)
    out = {"bench": "train_step", "config": config, "overrides": overrides, "trainer": cls.__name__,
           "model_version": cfg.model_version, "batch_size": cfg.batch_size, "image_size": cfg.image_size,
           "gradient_checkpointing": cfg.gradient_checkpointing, "optimizer": cfg.optimizer,
           "steps": len(times), "median_step_s": median, "images_per_s": images / median,
           "peak_memory_bytes": peak, "peak_memory_kind": how, "device": _device_name(dist.device),
           "torch": torch.__version__, "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"}
    if dist.device.type == "cuda":
        tflops = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in out["device"]), None)
        flops = forward_flops(cfg, cls.__name__)
        out["flops_per_update"] = flops
        out["mfu"] = flops / median / (tflops * 1e12) if tflops else None
    return out


def _model_version(config: str, overrides: list[str]) -> str:
    """model_version from the YAML / --set, read before choosing the trainer class."""
    import yaml

    version = (yaml.safe_load(Path(config).read_text()) or {}).get("model_version", "")
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model_version":
            version = value.strip()
    return str(version)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trainer", choices=["c", "b", "c_lora", "c_controlnet"], default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import logging

    # The summary line is the output: silence INFO/WARNING logs for the run, and restore
    # logging afterwards (main() is also called in-process by tests).
    logging.disable(logging.WARNING)
    try:
        r = bench(args.config, args.steps, args.overrides, args.trainer, args.warmup, args.peak_tflops)
    finally:
        logging.disable(logging.NOTSET)
    mfu = f", MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else ""
    return report(f"train_step {r['trainer']} {r['model_version']} batch {r['batch_size']} {r['image_size']}px "
                  f"ckpt={r['gradient_checkpointing']}: median {r['median_step_s'] * 1000:.1f} ms/step, "
                  f"{r['images_per_s']:.2f} images/s, peak {r['peak_memory_bytes'] / 2**20:.0f} MiB "
                  f"({r['peak_memory_kind']}){mfu} on {r['device']}", r, args.out)


if __name__ == "__main__":
    sys.exit(main())
