#!/usr/bin/env python3
"""Convert a Stage C / Stage B checkpoint between our (official) layout and diffusers' StableCascadeUNet.

    python3 tools/export_diffusers.py models/stage_c_bf16.safetensors --out my_prior/ \
        [--stage c|b] [--model-version 3.6B] [--dtype keep|float32|bfloat16|float16]
    python3 tools/export_diffusers.py my_prior/ --to-official --out stage_c_mine.safetensors --stage c

The default direction writes a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``
that ``diffusers.StableCascadeUNet.from_pretrained(folder)`` loads (for a pipeline, put it as the
``prior`` / ``decoder`` sub-folder). ``--to-official`` reads a diffusers folder (or its single
safetensors file) and writes the official layout. Both directions are exact (renames and q/k/v row
splits only), and the stage/model_version is recognised from the file unless given. A diffusers
folder also loads directly as ``generator_checkpoint_path`` (training and inference). See
docs/DIFFUSERS.md.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import NoReturn

from core.errors import UserError, run_cli

DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
STAGES = {"c": "stage_c", "b": "stage_b"}


class _NoMatch(UserError):
    """No registered version matches; ``agree`` = keys of the closest one with the right shape."""

    def __init__(self, message: str, agree: int) -> None:
        super().__init__(message)
        self.agree = agree


def _recognise(shapes: dict, stage: str | None, model_version: str | None, source: str) -> tuple[str, str]:
    """``(kind, model_version)`` of an official-layout state dict (exact key/shape match); else
    ``_NoMatch`` naming the closest registered stage/version and the tensors that differ."""
    from modules.loading import state_dict_mismatch
    from modules.registry import MODEL_CONFIGS, registered_shapes

    kinds = [STAGES[stage]] if stage else list(STAGES.values())
    closest = None
    for kind in kinds:
        versions = [model_version] if model_version else list(MODEL_CONFIGS[kind])
        for version in versions:
            if version not in MODEL_CONFIGS[kind]:
                continue
            expected = registered_shapes(kind, version)
            if expected == shapes:
                return kind, version
            agree = sum(1 for k, v in shapes.items() if expected.get(k) == v)
            if closest is None or agree > closest[0]:
                closest = (agree, kind, version, expected)
    what = " ".join(x for x in (f"Stage {stage.upper()}" if stage else "Stage C/B", model_version) if x)
    if closest is None or closest[0] == 0:
        raise _NoMatch(f"{source} is not a {what} checkpoint in the official layout (no registered version matches "
                       f"its keys and shapes); pass --stage/--model-version or check the file", 0)
    agree, kind, version, expected = closest
    name = f"Stage {kind[-1].upper()} model_version {version}"
    raise _NoMatch(f"{source} is closest to {name} ({agree} of {len(expected)} tensors agree) but differs: "
                   f"{state_dict_mismatch(expected, shapes)}; the file is damaged or incomplete "
                   f"(or pass --stage/--model-version)", agree)


def export(src: str, out: str, stage: str | None = None, model_version: str | None = None,
           dtype: str = "keep") -> dict:
    """Our file ``src`` -> diffusers folder ``out``; returns a summary."""
    import torch

    from modules.diffusers_format import save_diffusers
    from fileio.state_dicts import read_state_dict

    sd = read_state_dict(src)
    kind, version = _recognise({k: tuple(v.shape) for k, v in sd.items()}, stage, model_version, src)
    cast = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None
    folder = save_diffusers(sd, kind, version, out, dtype=cast)
    return {"out": str(folder), "kind": kind, "model_version": version, "tensors": len(sd)}


def to_official(src: str, out: str, stage: str | None = None, model_version: str | None = None,
                dtype: str = "keep") -> dict:
    """Diffusers folder/file ``src`` -> our (official) file ``out``; returns a summary."""
    import torch

    from modules.diffusers_format import (KINDS, diffusers_weights_path, from_diffusers, is_diffusers_layout,
                                          read_diffusers)
    from fileio.state_dicts import read_state_dict, save_safetensors

    found = diffusers_weights_path(src)
    if found is None:
        raise UserError(f"{src}: not a diffusers StableCascadeUNet folder or safetensors file")
    raw = read_state_dict(found[0])
    if not is_diffusers_layout(raw):
        raise UserError(f"{src}: the weights are not in the diffusers layout")
    kinds = [STAGES[stage]] if stage else list(KINDS)
    # Stage B renames clip_mapper, so the kind decides the conversion: try each, keep the exact match.
    errors: list[_NoMatch] = []
    for kind in kinds:
        sd = from_diffusers(raw, kind, str(found[0]))
        try:
            kind, version = _recognise({k: tuple(v.shape) for k, v in sd.items()}, kind[-1], model_version, src)
        except _NoMatch as exc:
            errors.append(exc)
            continue
        sd = read_diffusers(src, kind, version)  # checks config.json too
        cast = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None
        save_safetensors(sd, out, dtype=cast, metadata={"converted_from": "diffusers", "model_version": version})
        return {"out": out, "kind": kind, "model_version": version, "tensors": len(sd)}
    raise max(errors, key=lambda e: e.agree)  # the stage the file is closest to, not the last one tried


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="our .safetensors (default) or a diffusers folder/file (--to-official)")
    parser.add_argument("--out", required=True, help="diffusers folder to write (or, --to-official, a .safetensors)")
    parser.add_argument("--to-official", action="store_true", help="convert a diffusers folder/file to our layout")
    parser.add_argument("--stage", choices=sorted(STAGES), default=None, help="c or b (default: recognised)")
    parser.add_argument("--model-version", default=None, help="registered version (default: recognised)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="dtype of the written weights")
    args = parser.parse_args(argv)
    if os.path.abspath(args.out) == os.path.abspath(args.src):
        raise UserError("--out must differ from the input")
    run = to_official if args.to_official else export
    print(json.dumps(run(args.src, args.out, args.stage, args.model_version, args.dtype)))
    return 0


def cli() -> NoReturn:
    """The command line (console script ``cascade-export-diffusers``): ``error: ...`` and exit 2 on a user error."""
    run_cli(main)


if __name__ == "__main__":
    cli()
