"""CPU demo: train a tiny Stage C from scratch on real photographs and see it learn, offline.

    python3 demo.py [--updates N] [--out runs] [--threads 1] [--seed N]

1. demo assets (tools/make_demo_assets.py) under runs/demo_assets/: a captioned webdataset of a
   few photographs bundled with scikit-image (one view each), a tiny random CLIP, a small
   EfficientNet-style encoder + Previewer fitted together on those photographs as an autoencoder
   (prints the reconstruction PSNR), and the encoder cache of the dataset (tools/cache_dataset.py);
2. trains the tiny Stage C of configs/training/demo_c.yaml from scratch with the real training
   script (train/train_c.py: same loop, checkpoints, previews and logging as a full finetune),
   from the encoder cache (cache_path), keeping an EMA of the weights;
3. samples one image per dataset caption from the EMA weights, decodes it with the Previewer and prints
   ``retrieval: K/N``: for how many captions the nearest training photo (pixel space, at preview
   size) of the sample is the captioned photo; writes the grid caption | photo | Previewer(photo) |
   sample to runs/output/demo_c/demo_grid.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

# Before torch is imported: idle OpenMP threads sleep instead of spinning, so a busy machine does
# not slow the demo down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent

CONFIG = "configs/training/demo_c.yaml"
#: photographs (the first N of tools/make_demo_assets.PHOTOS), one view each (the full photo): the
#: demo memorises each caption's photo, and retrieval is measured against exactly that photo
N_PHOTOS, N_VARIANTS = 4, 1
#: Adam steps of the encoder + Previewer autoencoder fit, each on all N_PHOTOS photos: 2000 steps
#: reach 31.5 dB at preview size in ~85 s on one core (400 steps of 16 images: 17 dB, a brown
#: blur; 1500 steps: 29 dB, and a run on those latents drew the astronaut as a jumble: measured)
AE_STEPS, AE_BATCH = 2000, N_PHOTOS
#: the demo's sampler: the official training-preview DDPM settings (20 steps from t = 1, cfg_rho
#: 0.7) at a lower guidance scale: CFG 1.5-3 all gave retrieval 4/4 on the default run's
#: checkpoint with two sampling seeds, CFG 1 2/4 with one of them (measured); CFG 5 overshoots
SAMPLING = {"cfg": 2.0, "timesteps": 20}


def _losses(metrics_path: Path) -> list[float]:
    losses = []
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("loss") is not None and "step" in rec:
                losses.append(float(rec["loss"]))
    return losses


def make_assets(assets: Path, cfg) -> float:
    """Dataset, frozen parts and the encoder cache in ``assets``; returns the autoencoder's
    reconstruction PSNR. ``cfg``: the demo config with the asset paths."""
    from tools.cache_dataset import cache_dataset
    from tools.make_demo_assets import make_dataset, make_demo_models, photo_batch

    images = photo_batch(N_PHOTOS, N_VARIANTS, cfg.image_size)
    _, psnr = make_demo_models(assets, images, AE_STEPS, batch_size=AE_BATCH)
    make_dataset(assets, image_size=cfg.image_size, n_variants=N_VARIANTS, n_shards=1, limit=N_PHOTOS)
    # the frozen encoders run once here (tools/cache_dataset.py), not at every training update
    cache_dataset(cfg, str(assets / "cache"), batch_size=N_PHOTOS * N_VARIANTS, progress=False)
    (assets / "autoencoder.json").write_text(json.dumps({"psnr_db": psnr, "steps": AE_STEPS}) + "\n")
    (assets / "READY").write_text("ok\n")
    return psnr


def results(run_dir: Path, assets: Path, preview_dir: Path, cfg) -> tuple[list[int], Path]:
    """Sample one image per dataset caption from the run's generator, find each sample's nearest
    photo, write the grid; returns (nearest photo index per caption, grid path)."""
    from inference.sampling import from_preset
    from tools.demo_results import reconstruct, retrieval, sample_captions, write_grid
    from tools.make_demo_assets import PHOTOS, photo_batch

    captions = [caption for _, caption in PHOTOS[:N_PHOTOS]]
    photos = photo_batch(N_PHOTOS, 1, cfg.image_size)  # variant 0: the full photo (centre square)
    latent_hw = (cfg.image_size // 32, cfg.image_size // 32)
    settings = from_preset("stage_c_preview").replace(**SAMPLING)
    # the EMA of the weights samples better than the last update's (lr 3e-3 leaves them noisy)
    weights = run_dir / ("generator_ema.safetensors" if cfg.ema_enabled else "generator.safetensors")
    samples = sample_captions(weights, cfg.model_version, assets / "clip" / "text",
                              assets / "previewer.safetensors", captions, latent_hw, settings, seed=cfg.seed)
    recon = reconstruct(assets / "effnet_encoder.safetensors", assets / "previewer.safetensors", photos)
    nearest = retrieval(samples, photos)
    return nearest, write_grid(preview_dir / "demo_grid.png", captions, photos, recon, samples, nearest)


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="cascade-train CPU demo (tiny Stage C from scratch)")
    parser.add_argument("--updates", type=int, default=0, help="optimizer updates (default: the config's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the demo's networks are so small that 2 threads "
                             "ran 2-2.5x slower on 2 idle cores, measured; 0 = all idle cores)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the run (default: the config's, 42)")
    parser.add_argument("--out", default="runs", help="folder for assets, checkpoints and previews (default runs/)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    out = Path(args.out)
    assets = out / "demo_assets"
    import torch

    from core.config import load_config
    from train.train_c import StageCTrainer

    threads = args.threads
    if not threads:  # all cores, minus those other programs keep busy
        cores = os.cpu_count() or 1
        busy = int(round(os.getloadavg()[0])) if hasattr(os, "getloadavg") else 0
        threads = max(1, min(cores, cores - busy))
    torch.set_num_threads(threads)
    started = time.time()
    experiment = "demo_c"
    run_dir = out / "checkpoints" / experiment
    preview_dir = out / "output" / experiment
    paths = {"checkpoint_path": out / "checkpoints", "output_path": out / "output",
             "webdataset_path": assets / "shards", "effnet_checkpoint_path": assets / "effnet_encoder.safetensors",
             "previewer_checkpoint_path": assets / "previewer.safetensors",
             "clip_text_model_name": assets / "clip" / "text", "clip_image_model_name": assets / "clip" / "vision"}
    overrides = [f"{k}={v}" for k, v in paths.items()]
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(StageCTrainer.Config, CONFIG, overrides, validate_only=True)  # the assets may not exist yet
    updates = args.updates or cfg.updates
    if not (assets / "READY").is_file():
        print(f"[1/4] making the demo dataset, a tiny CLIP, the encoder + Previewer autoencoder "
              f"({AE_STEPS} steps) and the encoder cache in {assets}/ ...", flush=True)
        psnr = make_assets(assets, cfg)
    else:
        print(f"[1/4] reusing the demo assets in {assets}/", flush=True)
        psnr = json.loads((assets / "autoencoder.json").read_text())["psnr_db"]
    print(f"  autoencoder : Previewer(encoder(photo)) vs photo at preview size: PSNR {psnr:.1f} dB", flush=True)

    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts fresh
    shutil.rmtree(preview_dir, ignore_errors=True)
    print(f"[2/4] training a tiny Stage C from scratch for {updates} updates from the encoder cache "
          f"(python3 train/train_c.py {CONFIG})", flush=True)
    save_every = max(1, updates // 2)
    overrides += [f"cache_path={assets / 'cache'}", f"experiment_id={experiment}", f"updates={updates}",
                  f"save_every={save_every}", "log_every=1"]
    StageCTrainer.main([CONFIG, *[x for o in overrides for x in ("--set", o)], "--resume", "never"])

    print("[3/4] sampling one image per caption", flush=True)
    nearest, grid = results(run_dir, assets, preview_dir, cfg)
    hits = sum(int(j == i) for i, j in enumerate(nearest))

    print("[4/4] results", flush=True)
    losses = _losses(run_dir / "metrics.jsonl")
    k = min(50, max(1, len(losses) // 2))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    previews = sorted(preview_dir.glob("generator_0*.png"))
    print(f"  checkpoints : {run_dir}/ (generator.safetensors, state/step_*/, latest)")
    print(f"  loss curve  : {run_dir / 'loss.png'}")
    print(f"  preview grid: {previews[-1] if previews else '(none)'} (training previews, official settings)")
    print(f"  metrics     : {run_dir / 'metrics.jsonl'}")
    print(f"  loss        : first {k} updates {first:.4f} -> last {k} updates {last:.4f} "
          f"({'FELL' if last < first else 'did NOT fall'}, {100 * (first - last) / first:.0f} %)")
    print(f"  autoencoder : reconstruction PSNR {psnr:.1f} dB (Previewer's view of the photos)")
    print(f"  demo grid   : {grid} (caption | photo | Previewer(photo) | sample)")
    print("  nearest     : " + ", ".join(f"caption {i + 1} -> photo {j + 1}" for i, j in enumerate(nearest)))
    print(f"retrieval: {hits}/{len(nearest)}")
    print(f"  time        : {time.time() - started:.0f} s")
    return 0 if last < first else 1


if __name__ == "__main__":
    from core.errors import run_cli

    run_cli(demo)
