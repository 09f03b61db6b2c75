"""Cache speed-up: Stage C training steps/s from images (encoders every step) vs from a cache.

    python3 bench/cache_speedup.py --config configs/training/tiny_c.yaml [--steps 5] [--set k=v ...] \
        [--out result.json]

Caches the first ``batch_size x (steps + 1)`` samples of the config's dataset with
``tools/cache_dataset.py``, then times the same number of full steps (loss, backward, AdamW step)
both ways through the Stage C trainer's own loss code: ``compute_loss`` on image batches, and the
cached conditions (same random draws) + the job's diffusion loss on cache batches. The first step of each
path is warm-up. One summary line; ``--out`` writes JSON.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import report


def _time_steps(step, batches, n: int) -> list[float]:
    times = []
    for i in range(n + 1):
        start = time.perf_counter()
        step(next(batches), i)
        times.append(time.perf_counter() - start)
    return times[1:]


def bench(config: str, steps: int, overrides: list[str]) -> dict:
    from core.config import load_config
    from core.data import build_pipeline
    from core.distributed import DistInfo
    from tools.cache_dataset import cache_dataset
    from train.stage_c_cache import build_cache_pipeline, cached_conditions, load_unconditional
    from train.train_c import StageCConfig, StageCTrainer

    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    cfg = load_config(StageCConfig, config, list(overrides) + [f"checkpoint_path={work}/ck", f"output_path={work}/out"])
    per_rank = cfg.per_rank_batch(1)
    cache_dataset(cfg, str(work / "cache"), batch_size=per_rank, max_samples=per_rank * (steps + 1), progress=False)
    trainer = StageCTrainer(cfg, dist=DistInfo())
    trainer.build_models()  # registered frozen parts are frozen on registration
    gen = trainer.generator.train()
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-5)
    uncond = load_unconditional(work / "cache")
    c_img = trainer.image_model.config.projection_dim

    def image_step(batch, i):
        trainer.micro_step = (i + 1, 0)
        loss, _ = trainer.compute_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cache_step(batch, i):
        trainer.micro_step = (i + 1, 0)
        gens = trainer.sample_generators(len(batch["latents"]))
        cond = cached_conditions(batch, uncond, gens, cfg.text_dropout, cfg.image_embed_prob, c_img)
        loss, _ = trainer.loss(lambda x, r: gen(x, r, **cond), batch["latents"], gens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    images = iter(build_pipeline(cfg, batch_size=per_rank, seed=cfg.seed, num_workers=cfg.num_workers))
    t_img = _time_steps(image_step, images, steps)
    cached = build_cache_pipeline(work / "cache", per_rank, seed=cfg.seed, num_workers=cfg.num_workers)
    try:
        t_cache = _time_steps(cache_step, cached, steps)
    finally:
        cached.close()
    img_sps, cache_sps = 1 / statistics.median(t_img), 1 / statistics.median(t_cache)
    return {"bench": "cache_speedup", "config": config, "overrides": overrides, "model_version": cfg.model_version,
            "batch_size": per_rank, "image_size": cfg.image_size, "steps": steps,
            "steps_per_s_images": img_sps, "steps_per_s_cache": cache_sps, "speedup": cache_sps / img_sps,
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import logging

    # The summary line is the output: silence INFO/WARNING logs for the run, and restore
    # logging afterwards (main() is also called in-process by tests).
    logging.disable(logging.WARNING)
    try:
        r = bench(args.config, args.steps, args.overrides)
    finally:
        logging.disable(logging.NOTSET)
    return report(f"cache_speedup {r['model_version']} batch {r['batch_size']} {r['image_size']}px: "
                  f"{r['steps_per_s_images']:.3f} steps/s from images, {r['steps_per_s_cache']:.3f} steps/s from cache "
                  f"(x{r['speedup']:.2f}) on {r['device']}", r, args.out)


if __name__ == "__main__":
    sys.exit(main())
