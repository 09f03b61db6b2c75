#!/usr/bin/env python3
"""Bake a LoRA into a Stage C checkpoint: safetensors in, safetensors out (official layout).

    python3 tools/lora_merge.py --base models/stage_c_bf16.safetensors --lora runs/x/lora.safetensors \
        --out models/stage_c_x.safetensors [--strength 1.0] [--module-filters .attn] [--dtype keep]

The LoRA may be in any supported layout (docs/LORA.md): ours (named keys), the official positional
one (needs the module_filters it was trained with: taken from --module-filters, else ['.attn']) or
ComfyUI/kohya. The model version comes from --model-version, else the LoRA's metadata, else it is
recognised from the checkpoint. Each update is added in
float32 and cast back to the weight's dtype. Trained token embeddings belong to the CLIP text
encoder, not to Stage C: they are NOT merged (a note says so); sample with the LoRA file and
``train_tokens`` for them (inference config ``lora_checkpoint_path``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import NoReturn

from core.errors import UserError, run_cli

DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def merge_files(base: str, lora: str, out: str, strength: float = 1.0, module_filters: list[str] | None = None,
                dtype: str = "keep", model_version: str | None = None) -> dict:
    """Merge ``lora`` into ``base`` and write ``out``; returns a summary dict."""
    import torch

    from modules.lora_formats import (check_stage_c_version, merge_entries, metadata_list, read_entries, read_lora_file,
                              read_tokens, stage_c_targets)
    from fileio.state_dicts import read_state_dict, save_safetensors

    base_sd = read_state_dict(base)
    sd, meta = read_lora_file(lora)
    version = check_stage_c_version(base_sd, model_version or meta.get("model_version"), source=base)
    filters = module_filters or metadata_list(meta, "module_filters") or [".attn"]
    targets, shapes = stage_c_targets(version, filters)
    entries = read_entries(sd, shapes, official_targets=targets, source=lora)
    if not entries:
        raise UserError(f"{lora} holds no LoRA weights (only token embeddings?); nothing to merge")
    merged = merge_entries(base_sd, entries, strength, source=lora)
    cast = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None
    note = {"merged_lora": os.path.basename(lora), "lora_strength": repr(float(strength)), "model_version": version}
    save_safetensors(merged, out, dtype=cast, metadata=note)
    tokens = read_tokens(sd)
    return {"model_version": version, "merged": len(entries), "tokens_not_merged": 0 if tokens is None else
            int(tokens[0].numel()), "out": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="Stage C checkpoint (.safetensors, official layout)")
    parser.add_argument("--lora", required=True, help="LoRA file (ours, official positional, ComfyUI or kohya)")
    parser.add_argument("--out", required=True, help="merged checkpoint to write (.safetensors)")
    parser.add_argument("--strength", type=float, default=1.0, help="multiplier of the LoRA update (default 1)")
    parser.add_argument("--module-filters", nargs="+", default=None,
                        help="module_filters of an official positional LoRA (default: file metadata, else .attn)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="dtype of the written weights")
    parser.add_argument("--model-version", default=None,
                        help="Stage C version of --base (default: the LoRA's metadata, else recognised from the file)")
    args = parser.parse_args(argv)
    if not math.isfinite(args.strength):  # argparse takes "nan" and "inf" as floats
        raise UserError(f"--strength must be a finite number, got {args.strength}")
    if os.path.abspath(args.out) == os.path.abspath(args.base):
        raise UserError("--out must differ from --base (the base checkpoint is never overwritten)")
    summary = merge_files(args.base, args.lora, args.out, args.strength, args.module_filters, args.dtype,
                          args.model_version)
    print(json.dumps(summary))
    if summary["tokens_not_merged"]:
        print(f"note: {summary['tokens_not_merged']} trained token embedding(s) are not part of Stage C and were not "
              f"merged; sample with the LoRA file and train_tokens to use them", file=sys.stderr)
    return 0


def cli() -> NoReturn:
    """The command line (console script ``cascade-lora-merge``): ``error: ...`` and exit 2 on a user error."""
    run_cli(main)


if __name__ == "__main__":
    cli()
