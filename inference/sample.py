"""Command line: prompts -> PNGs (with the prompt, seed and settings in their text metadata).

    python3 -m inference.sample --config configs/inference/stage_c_3b.yaml \\
        --stage-b-config configs/inference/stage_b_3b.yaml --prompt "an astronaut" --out out/ --seed 42

Modes: text-to-image (default), ``--variation IMAGE``, ``--img2img IMAGE``, ``--control-image
IMAGE`` (ControlNet configs), ``--reconstruct IMAGE...`` (Stage B config only). See
inference/README.md.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from inference.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line + exit 2, like every other user error
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    p = _Parser(prog="python3 -m inference.sample", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="Stage C inference config (or a Stage B one for --reconstruct)")
    p.add_argument("--stage-b-config", help="Stage B inference config (full-resolution decoding)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="prompt file: one prompt per line ('#' comments) with optional kohya "
                                            "options --w --h --s --l --d --n (width, height, Stage C steps, "
                                            "Stage C CFG, seed, negative prompt), or a YAML list (inference/prompts.py)")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first batch (+1 per batch)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=1, help="prompts sampled together")
    p.add_argument("--steps-c", type=int)
    p.add_argument("--steps-b", type=int)
    p.add_argument("--cfg-c", type=float)
    p.add_argument("--cfg-b", type=float)
    p.add_argument("--shift-c", type=float)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "lcm"])
    p.add_argument("--lora-strength", type=float, help="overrides lora_strength of the config")
    p.add_argument("--control-image", help="ControlNet input image (ControlNet configs)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--variation", metavar="IMAGE", help="image variation of IMAGE")
    mode.add_argument("--img2img", metavar="IMAGE", help="image-to-image from IMAGE")
    mode.add_argument("--reconstruct", metavar="IMAGE", nargs="+",
                      help="effnet -> Stage B -> Stage A reconstruction of these images")
    p.add_argument("--strength", type=float, default=0.8, help="img2img noise level (0.8)")
    p.add_argument("--size", type=int, help="reconstruction: shorter side (default: image_size/none)")
    p.add_argument("--root", help="folder that relative checkpoint paths are resolved against")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Stage C config key (repeatable)")
    p.add_argument("--set-b", dest="overrides_b", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Stage B config key (repeatable)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--offload", action="store_true", help="one stage on the GPU at a time")
    p.add_argument("--preview-only", action="store_true",
                   help="skip Stage B/A: write the Previewer's small Stage C previews")
    p.add_argument("--no-progress", action="store_true", help="hide the per-stage progress bars")
    return p


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "image"


def _prompts(args: argparse.Namespace) -> list:
    """The prompts as ``inference.prompts.PromptSpec`` (a prompt file's own settings override the flags)."""
    from inference.prompts import PromptSpec, read_prompt_file

    if args.prompts_file:
        return read_prompt_file(args.prompts_file)
    return [PromptSpec(args.prompt if args.prompt is not None else "")]


def _batches(specs: list, batch_size: int) -> list[list]:
    """Consecutive prompts with the same settings, at most ``batch_size`` together."""
    out: list[list] = []
    for spec in specs:
        if out and len(out[-1]) < batch_size and out[-1][0].settings() == spec.settings():
            out[-1].append(spec)
        else:
            out.append([spec])
    return out


def _check(args: argparse.Namespace) -> None:
    if not args.config and not args.stage_b_config:
        raise UserError("give --config (Stage C) and/or --stage-b-config (Stage B)")
    if not (args.reconstruct or args.variation or args.img2img) and args.prompt is None \
            and not args.prompts_file:
        raise UserError("give --prompt or --prompts-file (or --reconstruct/--variation/--img2img)")
    if args.control_image and (args.reconstruct or args.variation):
        raise UserError("--control-image works with text-to-image and --img2img only")
    for name in ("height", "width", "num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")


def _check_control(args: argparse.Namespace) -> None:
    """A ControlNet config needs --control-image in every Stage C mode: checked on the config
    alone, before any model loads."""
    from inference.config import load_inference_config
    from inference.pipeline import no_control_image_message

    if args.control_image or args.reconstruct or not args.config:
        return
    cfg = load_inference_config(args.config, list(args.overrides), args.root)
    if cfg.stage == "c" and cfg.uses_controlnet:
        raise UserError(no_control_image_message(cfg.controlnet_filter))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit code (user errors raise UserError)."""
    from inference.images import save_png, side_by_side
    from inference.pipeline import CascadePipeline

    args = build_parser().parse_args(argv)
    _check(args)
    _check_control(args)
    overrides = list(args.overrides)
    if args.lora_strength is not None:
        overrides.append(f"lora_strength={args.lora_strength}")
    pipe = CascadePipeline.from_config(
        args.config, args.stage_b_config, device=args.device, overrides=overrides,
        stage_b_overrides=args.overrides_b, root=args.root, offload=args.offload or None,
        progress=not args.no_progress)
    out = Path(args.out)
    written: list[Path] = []
    if args.reconstruct:
        for i, path in enumerate(args.reconstruct):
            prompt = args.prompt or ""
            (original, recon), = pipe.reconstruct(path, prompt, size=args.size, seed=args.seed + i,
                                                  steps_b=args.steps_b, cfg_b=args.cfg_b,
                                                  sampler=args.sampler)
            stem = f"{i:05d}_{_slug(Path(path).stem)}"
            meta = dict(recon.info, source=str(path))
            written.append(save_png(recon, out / f"{stem}_recon.png", meta))
            written.append(save_png(side_by_side(original, recon), out / f"{stem}_pair.png", meta))
    else:
        count = 0
        for batch_index, specs in enumerate(_batches(_prompts(args), args.batch_size)):
            chunk, first = [s.prompt for s in specs], specs[0]
            pick = lambda own, default: default if own is None else own  # noqa: E731
            common = dict(num_images=args.num_images, height=pick(first.height, args.height),
                          width=pick(first.width, args.width), seed=pick(first.seed, args.seed + batch_index),
                          preview_only=args.preview_only, steps_c=pick(first.steps, args.steps_c),
                          steps_b=args.steps_b, cfg_c=pick(first.cfg, args.cfg_c), cfg_b=args.cfg_b,
                          shift_c=args.shift_c, sampler=args.sampler)
            if first.negative and (args.variation or args.img2img):
                raise UserError("a negative prompt (--n) works with text-to-image only")
            if args.variation:
                images = pipe.image_variation(args.variation, chunk, **common)
            elif args.img2img:
                images = pipe.image_to_image(args.img2img, chunk, strength=args.strength,
                                             control_image=args.control_image, **common)
            else:
                images = pipe.text_to_image(chunk, control_image=args.control_image, negative_prompt=first.negative,
                                            **common)
            for image in images:
                name = f"{count:05d}_{_slug(image.info.get('prompt', ''))}.png"
                written.append(save_png(image, out / name, image.info))
                count += 1
    for path in written:
        print(path)
    return 0


def cli() -> NoReturn:
    """The command line (console script ``cascade-sample``): ``error: ...`` and exit 2 on a user error."""
    from core.errors import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
