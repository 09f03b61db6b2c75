"""Golden tiny runs of the four training jobs: per-update losses and hashes of the final weights.

``python3 -m tests.helpers.golden_runs OUT.json`` (from the repository root) records them (first
before the core redesign, kept in ``tests/data/golden_runs.json`` under ``by_cpu``); ``tests/test_golden_runs.py``
reruns the jobs and compares bitwise with the record of this kind of CPU.

Why per CPU: the same code gives float32 results that differ in the last bit between CPU kinds
(the oneDNN / ATen kernels chosen for AVX2, AVX-512, AMX sum in different orders). Measured: the
pre-redesign commit, rerun on an AVX-512 + AMX machine, differs from the first record by ~1e-7 in
the losses. ``cpu_signature()`` names the kernel-relevant features; a CPU kind without a record is
compared with every record to a relative 1e-5 instead (behaviour, not the last bit).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

#: job -> (script module, trainer class, config, extra overrides)
JOBS = {
    "stage_c": ("train.train_c", "StageCTrainer", "configs/training/tiny_c.yaml",
                dict(batch_size=4, grad_accum_steps=2, ema_start_iters=1, ema_iters=1, ema_beta=0.9, adaptive_loss_weight=True,
                     preview_every=4)),
    "stage_b": ("train.train_b", "StageBTrainer", "configs/training/tiny_b.yaml",
                dict(generator_checkpoint_path=None, adaptive_loss_weight=True, preview_every=4)),
    "lora": ("train.train_c_lora", "StageCLoraTrainer", "configs/training/tiny_c_lora.yaml",
             dict(rank=2, lr=1.0e-2, train_tokens=[["[tinytok]", "^dog</w>"]], export_comfyui=True,
                  preview_every=4)),
    "controlnet": ("train.train_c_controlnet", "StageCControlNetTrainer",
                   "configs/training/tiny_c_controlnet_canny.yaml", dict(lr=0.1, preview_every=4)),
}
SAVED = ("generator.safetensors", "generator_ema.safetensors", "lora.safetensors", "controlnet.safetensors")


def tensor_hashes(path: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {k: hashlib.sha256(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(load_file(str(path)).items())}


def run_job(name: str, assets: Path, root: Path) -> dict:
    import importlib

    from tests.helpers.adapter_assets import STAGE_C_ONLY, cli_args, losses

    module, cls, config, extra = JOBS[name]
    extra = dict(dict(experiment_id=name, updates=4, save_every=4), **extra)
    if name == "stage_b":
        extra["stage_a_checkpoint_path"] = str(assets / "stage_a.safetensors")
    drop = STAGE_C_ONLY if name == "stage_b" else ()
    args = cli_args(str(ROOT / config), assets, root, drop=drop, **extra)
    trainer_cls = getattr(importlib.import_module(module), cls)
    code = trainer_cls.main(args)
    assert code == 0, f"{name}: exit {code}"
    run_dir = root / "ck" / name
    files = {f: tensor_hashes(run_dir / f) for f in SAVED if (run_dir / f).is_file()}
    return {"losses": {str(k): v for k, v in losses(run_dir).items()}, "files": files}


def cpu_signature() -> str:
    """The CPU features that decide which float kernels torch runs (architecture, capability, AMX/AVX flags)."""
    import platform

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    wanted = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma")
    return " ".join([platform.machine(), torch.backends.cpu.get_cpu_capability(), *sorted(f for f in wanted if f in flags)])


def run_all(base: Path) -> dict:
    from tests.helpers.adapter_assets import make_adapter_assets

    torch.set_num_threads(1)
    assets = make_adapter_assets(base)
    return {name: run_job(name, assets, base / f"run_{name}") for name in JOBS}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = run_all(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps({"by_cpu": {cpu_signature(): result}}, indent=1, sort_keys=True) + "\n")
    print({k: len(v["files"]) for k, v in result.items()})
