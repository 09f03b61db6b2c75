"""Sampling benchmark: seconds per image for each stage of the cascade (C -> B -> A).

    python3 bench/sampling.py [--stage-c tiny] [--stage-b tiny] [--images 2] [--size 1024] \
        [--steps-c 20] [--steps-b 10] [--out result.json]

Random-init networks of the configured versions (weights do not change the cost), the official
inference sampling settings (gdf presets ``stage_c_inference`` / ``stage_b_inference``, with CFG, so
two forwards per step) and random conditions of the right shapes: it times the generators, not
CLIP. On GPU the models run in bf16 under autocast, like inference. Stage A decodes the Stage B
latents. One summary line; ``--out`` writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time

import torch

from bench.report import report


def _timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _last(gen) -> torch.Tensor:
    x0 = None
    for x0, _x, _pred in gen:
        pass
    return x0


def bench(stage_c: str = "tiny", stage_b: str = "tiny", images: int = 2, size: int = 1024, steps_c: int = 20,
          steps_b: int = 10, device: str | None = None) -> dict:
    from gdf import presets
    from modules.registry import build_model, model_config

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    torch.manual_seed(0)
    gen_c = build_model("stage_c", stage_c, device=dev, dtype=dtype).eval()
    gen_b = build_model("stage_b", stage_b, device=dev, dtype=dtype).eval()
    stage_a = build_model("stage_a", "default", device=dev).eval()
    kc, kb = model_config("stage_c", stage_c), model_config("stage_b", stage_b)
    n = images
    cond_c = {"clip_text": torch.randn(n, 77, kc.get("c_clip_text", 1280), device=dev, dtype=dtype),
              "clip_text_pooled": torch.randn(n, 1, kc.get("c_clip_text_pooled", 1280), device=dev, dtype=dtype),
              "clip_img": torch.zeros(n, 1, kc.get("c_clip_img", 768), device=dev, dtype=dtype)}
    uncond_c = {k: torch.zeros_like(v) for k, v in cond_c.items()}
    gdf_c, gdf_b = presets.stage_c(), presets.stage_b()
    side_c = -(-size * 3 // 128)             # ceil(size / 42.67): 24 for 1024
    g = torch.Generator(device=dev).manual_seed(0)
    results = {}
    with torch.no_grad(), autocast:
        kw = presets.sampling_kwargs("stage_c_inference", gdf_c)
        kw["timesteps"] = steps_c
        t_c, latent_c = _timed(lambda: _last(gdf_c.sample(gen_c, cond_c, (n, 16, side_c, side_c), uncond_c,
                                                          device=dev, generator=g, **kw)), dev)
        clip_b = torch.randn(n, 1, kb.get("c_clip", 1280), device=dev, dtype=dtype)
        cond_b = {"effnet": latent_c.to(dtype), "clip": clip_b}
        uncond_b = {"effnet": torch.zeros_like(cond_b["effnet"]), "clip": torch.zeros_like(clip_b)}
        kw = presets.sampling_kwargs("stage_b_inference", gdf_b)
        kw["timesteps"] = steps_b
        t_b, latent_b = _timed(lambda: _last(gdf_b.sample(gen_b, cond_b, (n, 4, size // 4, size // 4), uncond_b,
                                                          device=dev, generator=g, **kw)), dev)
    with torch.no_grad():
        t_a, pixels = _timed(lambda: stage_a.decode(latent_b.float()), dev)
    results = {"stage_c_s_per_image": t_c / n, "stage_b_s_per_image": t_b / n, "stage_a_s_per_image": t_a / n}
    return {"bench": "sampling", "stage_c": stage_c, "stage_b": stage_b, "images": n, "size": size,
            "steps_c": steps_c, "steps_b": steps_b, **results,
            "total_s_per_image": sum(results.values()), "output_shape": list(pixels.shape),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage-c", default="tiny")
    parser.add_argument("--stage-b", default="tiny")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps-c", type=int, default=20)
    parser.add_argument("--steps-b", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    r = bench(args.stage_c, args.stage_b, args.images, args.size, args.steps_c, args.steps_b, args.device)
    return report(f"sampling C {r['stage_c']} / B {r['stage_b']} {r['size']}px x{r['images']}: "
                  f"stage C {r['stage_c_s_per_image']:.3f} s/image ({r['steps_c']} steps), "
                  f"stage B {r['stage_b_s_per_image']:.3f} s/image ({r['steps_b']} steps), "
                  f"stage A {r['stage_a_s_per_image']:.3f} s/image, total {r['total_s_per_image']:.3f} s/image "
                  f"on {r['device']}", r, args.out)


if __name__ == "__main__":
    sys.exit(main())
