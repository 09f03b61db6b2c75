"""Synthetic weights on the released saliency network's layout (tests, tiny configs, demo assets).

    python3 tools/saliency_weights.py OUT.pt|OUT.safetensors [--seed N]

The file has exactly the layout of the released ``saliency_model.pt`` (docs/OFFICIAL.md, Saliency network: 35 float32
tensors, 111,233 parameters), seeded random values: the code that reads the real file is tested
without it. Its maps are not meaningful saliency, only well-formed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from modules.saliency import MicroResNet


def synthetic_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded MicroResNet weights; the InstanceNorm scales/shifts are drawn too (not 1/0), so a
    load that mixed them up would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MicroResNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.InstanceNorm2d):
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
        # Spread the output over (0, 1) like a real saliency map (sigmoid of about N(-1, 2)), so
        # thresholds in the official range [0.04, 0.4] give masks that are neither empty nor full.
        probe = torch.rand(1, 3, 240, 240, generator=g)
        pre = model.segmentator[:7](model.residual(model.downsampler(probe)))
        last = model.segmentator[6]
        scale = 2.0 / float(pre.std())
        last.weight.mul_(scale)
        last.bias.copy_(-1.0 - scale * (float(pre.mean()) - last.bias))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def write_synthetic_saliency(path: os.PathLike | str, seed: int = 0) -> Path:
    """Write synthetic saliency weights to ``path`` (``.pt``: a plain state-dict pickle like the
    released file; ``.safetensors`` otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = synthetic_state_dict(seed)
    if path.suffix == ".pt":
        tmp = path.with_name(path.name + ".tmp")
        torch.save(sd, tmp)
        os.replace(tmp, path)
    else:
        from fileio.state_dicts import save_safetensors

        save_safetensors(sd, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output file (.pt or .safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_synthetic_saliency(args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
