"""Tiny random-weight files for the CPU tests and demo of ``configs/inference/tiny_*.yaml``.

    python3 tools/make_tiny_inference_assets.py OUT_DIR
    # then: python3 -m inference.sample --config configs/inference/tiny_c.yaml --root OUT_DIR ...

Writes seeded random weights (zero-initialised layers are filled, otherwise every generator would
output zeros), a tiny CLIP folder, an official-layout LoRA with one trained token and a small
ControlNet. Nothing is downloaded. The images are noise, but every code path runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

TINY_TOKEN = "[tinytok]"
TINY_LORA_FILTERS = [".attn"]
TINY_LORA_RANK = 2
TINY_CNET_BLOCKS = [0, 2, 5]
TINY_FILES = {
    "stage_c": "stage_c_tiny.safetensors",
    "stage_b": "stage_b_tiny.safetensors",
    "stage_a": "stage_a.safetensors",
    "effnet": "effnet_encoder.safetensors",
    "previewer": "previewer.safetensors",
    "lora": "lora_tiny.safetensors",
    "controlnet": "controlnet_tiny_canny.safetensors",
}


@torch.no_grad()
def _fill_zeros(model: nn.Module, generator: torch.Generator, std: float = 0.05) -> nn.Module:
    for param in model.parameters():
        if param.is_floating_point() and not param.any():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def _build(kind: str, version: str, generator: torch.Generator) -> nn.Module:
    from modules.registry import build_model

    return _fill_zeros(build_model(kind, version), generator)


def write_tiny_setup(folder: str | Path, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write every tiny file under ``folder`` (skipped when already there); returns the paths."""
    from tools.tiny_clip import write_tiny_clip
    from modules.controlnet import ControlNet
    from fileio.state_dicts import save_safetensors

    from modules.lora import lora_targets

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = {name: root / file for name, file in TINY_FILES.items()}
    paths["clip"] = root / "clip"
    if not overwrite and all(p.exists() for p in paths.values()):
        return paths
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module constructors draw from the global RNG
        # widths match modules.registry's tiny Stage C (text 32, pooled 32, image 24) and Stage B
        write_tiny_clip(paths["clip"], text_width=32, projection_dim=32, vision_projection_dim=24,
                        seed=seed)
        stage_c = _build("stage_c", "tiny", gen)
        save_safetensors(stage_c, paths["stage_c"])
        save_safetensors(_build("stage_b", "tiny", gen), paths["stage_b"])
        for kind in ("stage_a", "effnet", "previewer"):
            save_safetensors(_build(kind, "default", gen), paths[kind])
        lora = {"embeddings.embeddings": torch.randn(1, 32, generator=gen) * 0.1,
                "embeddings.indices": torch.tensor([49408], dtype=torch.long)}
        for i, target in enumerate(lora_targets(stage_c, TINY_LORA_FILTERS)):
            weight = stage_c.get_parameter(target)
            lora[f"weights.{i}.lora_down"] = torch.randn(TINY_LORA_RANK, weight.size(1), generator=gen)
            lora[f"weights.{i}.lora_up"] = torch.randn(weight.size(0), TINY_LORA_RANK, generator=gen)
        save_safetensors(lora, paths["lora"])
        cnet = ControlNet(c_in=1, c_proj=32, proj_blocks=TINY_CNET_BLOCKS, bottleneck_mode="simple")
        save_safetensors(_fill_zeros(cnet, gen, std=0.5), paths["controlnet"])
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: write the tiny files into OUT_DIR."""
    parser = argparse.ArgumentParser(prog="python3 tools/make_tiny_inference_assets.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_tiny_setup(args.out_dir, seed=args.seed, overwrite=True)
    print(f"wrote {len(paths)} tiny files under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
