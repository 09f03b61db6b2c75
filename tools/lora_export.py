#!/usr/bin/env python3
"""Export a Stage C adapter (LoRA, DoRA, LoKr, LoHa) to another tool's key layout (+ a token embedding file).

    python3 tools/lora_export.py runs/x/lora.safetensors --out my_lora.safetensors \
        [--format comfyui|comfyui_model|kohya|onetrainer|diffusers] [--drop] \
        [--clip-text-model PATH_OR_NAME] [--dtype float16] [--model-version 3.6B] [--module-filters .attn] \
        [--base models/stage_c_bf16.safetensors]   # needed for a DoRA to ComfyUI: its dora_scale

The layouts are those of ``modules.adapters.layouts`` (docs/LORA.md has the table of kinds x layouts):
``comfyui`` (default, ``lora_prior_unet_<module>``), ``comfyui_model`` (``diffusion_model.<module>``),
``kohya`` (``lora_unet_<module>``, plain LoRAs), ``onetrainer`` (its original layout ``unet.<module>``,
q/k/v as ``attn.in_proj.0/1/2``) and ``diffusers`` (PEFT ``lora_A``/``lora_B``, alpha folded in). The
packed attention ``in_proj`` adapter becomes three (q/k/v rows) where the tool splits it. What a layout
cannot express (a DoRA to kohya, a depthwise-conv LoRA to OneTrainer, which reads it as another
function) is an error naming the layer and why; ``--drop`` leaves those out and lists them on stderr.
Layers a tool skips although the file holds them (kohya: depthwise convs) are warned about on stderr.
When tokens were trained, the FINAL embedding rows of those tokens (base row + trained delta) go to
``<out>_embeddings.safetensors`` (key ``clip_g``, shape (n_tokens, width), token strings in the
metadata): a textual-inversion style embedding; that needs the CLIP text model the LoRA was trained
with (``--clip-text-model``, default the name stored in the LoRA) to rebuild the base rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from core.errors import UserError, run_cli

DTYPES = ("float32", "float16", "bfloat16")
#: the layouts this tool writes (modules.adapters.layouts; ours and the official one come from training)
FORMATS = ("comfyui", "comfyui_model", "kohya", "onetrainer", "diffusers")


def token_vectors(sd: dict, meta: dict, clip_text_model: str):
    """``(final rows (n, width), token strings)`` of the trained tokens, rebuilt from the CLIP model."""
    import torch

    from modules.lora_formats import metadata_list, read_tokens
    from modules.lora_tokens import add_train_tokens
    from modules.conditioning import load_clip_text, load_tokenizer

    indices, deltas = read_tokens(sd)
    tokenizer = load_tokenizer(clip_text_model)
    text_model = load_clip_text(clip_text_model)
    add_train_tokens(tokenizer, text_model, metadata_list(meta, "train_tokens") or [])
    weight = text_model.get_input_embeddings().weight
    if int(indices.max()) >= weight.shape[0] or deltas.shape[1] != weight.shape[1]:
        raise UserError(f"the token embeddings (ids {indices.tolist()}, width {deltas.shape[1]}) do not fit "
                        f"{clip_text_model}; pass the CLIP text model the LoRA was trained with")
    with torch.no_grad():
        vectors = weight[indices].float() + deltas.float()
    return vectors, [str(t) for t in tokenizer.convert_ids_to_tokens(indices.tolist())]


def export_file(lora: str, out: str, clip_text_model: str | None = None, dtype: str | None = None,
                model_version: str | None = None, module_filters: list[str] | None = None,
                base: str | None = None, fmt: str = "comfyui", drop: bool = False) -> dict:
    """Write ``out`` in layout ``fmt``; returns a summary (``unloadable``: tool -> layers it
    skips, also warned on stderr; ``dropped``: what the layout cannot express, left out because
    ``drop`` was given, also listed on stderr; without ``drop`` that is an error)."""
    import torch

    from modules.adapters.layouts import layout
    from modules.lora_formats import (export_layout, metadata_list, pack_qkv, read_entries, read_lora_file,
                                      read_tokens, stage_c_targets, token_embedding_file, unloadable_targets)
    from fileio.state_dicts import save_safetensors

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown LoRA layout (known: {', '.join(FORMATS)})")
    sd, meta = read_lora_file(lora)
    version = model_version or meta.get("model_version") or "3.6B"
    filters = module_filters or metadata_list(meta, "module_filters") or [".attn"]
    targets, shapes = stage_c_targets(version, filters)
    entries = pack_qkv(read_entries(sd, shapes, official_targets=targets, source=lora), lora)
    base_weights = None
    if any(e.adapter.needs_base for e in entries) and layout(fmt).dora_form == "comfy":
        if not base:  # a DoRA: ComfyUI's dora_scale is computed from the base weights
            raise UserError(f"{lora} is a DoRA: pass --base, the Stage C checkpoint it was trained on "
                            f"(ComfyUI's dora_scale is computed from the base weights)")
        from fileio.state_dicts import read_state_dict

        base_weights = read_state_dict(base)
    comfy, dropped = export_layout(entries, fmt, shapes, dtype=getattr(torch, dtype) if dtype else None,
                                   base_weights=base_weights, drop=drop)
    for line in dropped:
        print(f"dropped: {line}", file=sys.stderr)
    unloadable = unloadable_targets([e.target for e in entries], shapes, fmt)
    for tool, layers in unloadable.items():
        print(f"warning: {tool} cannot load the LoRA on {len(layers)} depthwise conv layer(s) of {lora} "
              f"(it skips or refuses them): {', '.join(layers)}", file=sys.stderr)
    info = {"ss_network_module": "networks.lora", "cascade_adapter_kinds": ",".join(sorted({e.kind for e in entries})),
            "ss_network_dim": str(entries[0].rank) if entries else "0",
            "ss_network_alpha": repr(entries[0].alpha) if entries else "0", "ss_base_model_version": "stable_cascade_c",
            "cascade_model_version": version, "source": os.path.basename(lora)}
    save_safetensors(comfy, out, metadata=info)
    summary = {"out": out, "format": fmt, "loras": len(entries) - len(dropped),
               "model_version": version, "unloadable": unloadable, "dropped": dropped}
    if read_tokens(sd) is not None:
        name = clip_text_model or meta.get("clip_text_model_name")
        if not name:
            raise UserError("the LoRA has trained tokens: pass --clip-text-model (the CLIP it was trained with)")
        vectors, tokens = token_vectors(sd, meta, name)
        tensors, tmeta = token_embedding_file(vectors, tokens)
        emb_out = os.path.splitext(out)[0] + "_embeddings.safetensors"
        save_safetensors(tensors, emb_out, metadata=tmeta)
        summary.update(embeddings=emb_out, tokens=tokens)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lora", help="LoRA file (ours or official positional)")
    parser.add_argument("--out", required=True, help="LoRA file to write (.safetensors)")
    parser.add_argument("--format", choices=FORMATS, default="comfyui",
                        help="key layout: comfyui (lora_prior_unet_*), comfyui_model (diffusion_model.*), kohya "
                             "(lora_unet_*), onetrainer (unet.*, its original layout), diffusers (PEFT lora_A/lora_B)")
    parser.add_argument("--drop", action="store_true",
                        help="leave out (and list) what the layout cannot express instead of failing")
    parser.add_argument("--clip-text-model", default=None, help="CLIP text model of training (for token embeddings)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of lora_down/up (default: as stored)")
    parser.add_argument("--model-version", default=None, help="Stage C version (default: from the file, else 3.6B)")
    parser.add_argument("--module-filters", nargs="+", default=None,
                        help="module_filters of an official positional LoRA (default: metadata, else .attn)")
    parser.add_argument("--base", default=None, help="Stage C checkpoint the LoRA was trained on (DoRA only)")
    args = parser.parse_args(argv)
    print(json.dumps(export_file(args.lora, args.out, args.clip_text_model, args.dtype, args.model_version,
                                 args.module_filters, args.base, args.format, args.drop)))
    return 0


def cli() -> NoReturn:
    """The command line (console script ``cascade-lora-export``): ``error: ...`` and exit 2 on a user error."""
    run_cli(main)


if __name__ == "__main__":
    cli()
