"""CPU demo: train a tiny Stage C from scratch on real photographs, in a few minutes, offline.

    python3 demo.py [--updates 300] [--keep-assets]

1. builds a small captioned webdataset from the photographs bundled with scikit-image (astronaut,
   coffee, chelsea the cat, a rocket, motorcycles, ...) plus random crops/flips, and writes tiny
   random-init frozen parts (CLIP, EfficientNet encoder, Previewer) as "demo assets"
   (tools/make_demo_assets.py) under runs/demo_assets/;
2. trains the tiny Stage C of configs/training/tiny_c.yaml with the real training script
   (train/train_c.py: same loop, checkpoints, previews and logging as a full finetune);
3. prints where the checkpoints, the loss curve and the preview grid are, and whether the loss fell
   (mean of the first 50 vs the last 50 updates).
The encoders are random (the Previewer is fitted to them on the photos in a few seconds), so the
previews are blurry colour pictures at best; the point is the whole pipeline, on real data.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Before torch is imported: idle OpenMP threads sleep instead of spinning, so a busy machine does
# not slow the demo down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

CONFIG = "configs/training/tiny_c.yaml"


def _losses(metrics_path: Path) -> list[float]:
    losses = []
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("loss") is not None and "step" in rec:
                losses.append(float(rec["loss"]))
    return losses


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="cascade-train CPU demo (tiny Stage C from scratch)")
    parser.add_argument("--updates", type=int, default=300, help="optimizer updates (default 300)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all idle cores)")
    parser.add_argument("--out", default="runs", help="folder for assets, checkpoints and previews (default runs/)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    out = Path(args.out)
    assets = out / "demo_assets"
    import torch

    threads = args.threads
    if not threads:  # all cores, minus those other programs keep busy
        cores = os.cpu_count() or 1
        busy = int(round(os.getloadavg()[0])) if hasattr(os, "getloadavg") else 0
        threads = max(1, min(cores, cores - busy))
    torch.set_num_threads(threads)
    started = time.time()
    if not (assets / "READY").is_file():
        print(f"[1/3] making the demo dataset and random-init frozen parts in {assets}/ ...", flush=True)
        from tools.make_demo_assets import make_all

        make_all(assets, image_size=128, n_variants=6, n_shards=2, previewer_steps=60)
        (assets / "READY").write_text("ok\n")
    else:
        print(f"[1/3] reusing the demo assets in {assets}/", flush=True)

    experiment = "demo_c"
    run_dir = out / "checkpoints" / experiment
    preview_dir = out / "output" / experiment
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts fresh
    shutil.rmtree(preview_dir, ignore_errors=True)
    print(f"[2/3] training a tiny Stage C from scratch for {args.updates} updates "
          f"(python3 train/train_c.py {CONFIG})", flush=True)
    from train.train_c import StageCTrainer

    save_every = max(1, args.updates // 3)
    paths = {"checkpoint_path": out / "checkpoints", "output_path": out / "output",
             "webdataset_path": assets / "shards", "effnet_checkpoint_path": assets / "effnet_encoder.safetensors",
             "previewer_checkpoint_path": assets / "previewer.safetensors",
             "clip_text_model_name": assets / "clip" / "text", "clip_image_model_name": assets / "clip" / "vision"}
    overrides = [f"{k}={v}" for k, v in paths.items()]
    overrides += [f"experiment_id={experiment}", f"updates={args.updates}", f"save_every={save_every}", "log_every=1"]
    StageCTrainer.main([CONFIG, *[x for o in overrides for x in ("--set", o)], "--resume", "never"])

    print("[3/3] results", flush=True)
    losses = _losses(run_dir / "metrics.jsonl")
    k = min(50, max(1, len(losses) // 2))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    previews = sorted(preview_dir.glob("generator_0*.png"))
    print(f"  checkpoints : {run_dir}/ (generator.safetensors, state/step_*/, latest)")
    print(f"  loss curve  : {run_dir / 'loss.png'}")
    print(f"  preview grid: {previews[-1] if previews else '(none)'} (samples for the config's preview_prompts)")
    print(f"  reference   : {preview_dir / 'latest_reference.png'} "
          f"(the Previewer's view of real training images)")
    print(f"  metrics     : {run_dir / 'metrics.jsonl'}")
    print(f"  loss        : first {k} updates {first:.4f} -> last {k} updates {last:.4f} "
          f"({'FELL' if last < first else 'did NOT fall'}, {100 * (first - last) / first:.0f} %)")
    print(f"  time        : {time.time() - started:.0f} s")
    return 0 if last < first else 1


if __name__ == "__main__":
    from core.errors import run_cli

    run_cli(demo)
