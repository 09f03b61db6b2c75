"""The error a quantised frozen base adds (``base_dtype``, modules/quantize.py), in two figures:

1. per layer: the relative RMS output error of one layer against the same layer in bf16, for the
   layer shapes of Stage C 3.6B (channelwise MLP 2048 -> 8192 -> 2048, attention in-projection
   6144 x 2048, kv mapper 1280 -> 2048), random Gaussian weights with a few outlier columns (real
   checkpoints are not downloaded here), bf16 inputs; and the bytes stored per weight;
2. a tiny LoRA run (the tests' tiny Stage C and 4 photos, CPU): its losses on an int8 / float8 base
   against the same run on a bf16 base (same seed, data and noise).

    python3 bench/quant_error.py [--updates 30] [--out F.json]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

SHAPES = {"channelwise in 2048->8192": (2048, 8192), "channelwise out 8192->2048": (8192, 2048),
          "attn in_proj 2048->6144": (2048, 6144), "kv_mapper 1280->2048": (1280, 2048)}


def layer_errors(dtypes=("int8", "float8_e4m3fn"), blocks=(64, 0)) -> list[dict]:
    from modules.quantize import quantize_frozen_, quantized_bytes

    rows = []
    g = torch.Generator().manual_seed(0)
    for name, (c_in, c_out) in SHAPES.items():
        dense = nn.Linear(c_in, c_out).requires_grad_(False)
        with torch.no_grad():
            dense.weight.normal_(0, c_in ** -0.5, generator=g)
            dense.weight[:, :8] *= 20  # a few outlier input channels, as trained networks have
        dense = dense.to(torch.bfloat16)
        x = torch.randn(256, c_in, generator=g).to(torch.bfloat16)
        ref = dense(x).float()
        for dtype in dtypes:
            for block in blocks:
                quant = copy.deepcopy(dense)
                quantize_frozen_(quant, dtype, block)
                err = float((quant(x).float() - ref).norm() / ref.norm())
                stored, full = quantized_bytes(quant)
                rows.append({"layer": name, "dtype": dtype, "block": block, "rel_rms_error": err,
                             "bytes_per_weight": 2 * stored / full})
    return rows


def lora_runs(updates: int) -> dict[str, dict[int, float]]:
    from tests.helpers.adapter_assets import cli_args, losses, make_adapter_assets
    from train.train_c_lora import StageCLoraTrainer

    root = Path(tempfile.mkdtemp(prefix="quant_error_"))
    assets = make_adapter_assets(root)
    config = str(Path(__file__).resolve().parents[1] / "configs/training/tiny_c_lora.yaml")
    out = {}
    for name, extra in (("bfloat16", {}), ("int8", {"base_dtype": "int8"}),
                        ("float8_e4m3fn", {"base_dtype": "float8_e4m3fn"})):
        args = cli_args(config, assets, root, experiment_id=name, updates=updates, save_every=updates, lr=1e-2,
                        rank=2, frozen_dtype="bfloat16", train_tokens=None, export_comfyui=False, **extra)
        if StageCLoraTrainer.main(args + ["--resume", "never"]) != 0:
            raise SystemExit(f"the {name} run failed")
        out[name] = losses(root / "ck" / name)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--out", default=None)
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    layers = layer_errors()
    print("| layer | dtype | block | rel. RMS error vs bf16 | bytes/weight |\n|---|---|---:|---:|---:|")
    for r in layers:
        print(f"| {r['layer']} | {r['dtype']} | {r['block'] or 'row'} | {100 * r['rel_rms_error']:.2f} % | "
              f"{r['bytes_per_weight']:.3f} |")
    runs = lora_runs(a.updates)
    base = runs["bfloat16"]
    steps = sorted(base)
    print(f"\n| tiny LoRA base | mean loss ({len(steps)} updates) | mean abs diff to bf16 | max abs diff | last loss |")
    print("|---|---:|---:|---:|---:|")
    summary = {}
    for name, ls in runs.items():
        diffs = [abs(ls[s] - base[s]) for s in steps]
        summary[name] = {"mean_loss": sum(ls[s] for s in steps) / len(steps), "mean_abs_diff": sum(diffs) / len(diffs),
                         "max_abs_diff": max(diffs), "last_loss": ls[steps[-1]]}
        s = summary[name]
        print(f"| {name} | {s['mean_loss']:.4f} | {s['mean_abs_diff']:.4f} | {s['max_abs_diff']:.4f} | "
              f"{s['last_loss']:.4f} |")
    from bench.report import report

    worst = {d: max(r["rel_rms_error"] for r in layers if r["dtype"] == d and r["block"] == 64) for d in
             ("int8", "float8_e4m3fn")}
    line = (f"quant_error: worst layer error vs bf16 (blocks of 64) int8 {100 * worst['int8']:.2f} %, float8_e4m3fn "
            f"{100 * worst['float8_e4m3fn']:.2f} %; tiny LoRA mean |loss - bf16 base| int8 "
            f"{summary['int8']['mean_abs_diff']:.4f}, float8_e4m3fn {summary['float8_e4m3fn']['mean_abs_diff']:.4f}")
    return report(line, {"layers": layers, "lora_runs": summary, "losses": runs}, a.out)


if __name__ == "__main__":
    sys.exit(main())
