"""CPU recipe: a LoRA with a new token on a folder of your own photos, and images that show it.

    python3 tools/lora_photos.py PHOTO_DIR [--token "[mytok]"] [--out runs/lora_photos]

What it does (all offline, one CPU thread, a few minutes; README "LoRA on your own photos"):

1. assets in OUT/assets/ (marked MADE_BY.json, tools/make_demo_assets.py): your photos (centre
   squares, at most MAX_PHOTOS) and the demo's first 4 photographs, a tiny CLIP, and the demo's small
   encoder + Previewer fitted as an autoencoder on ALL of them (so the Previewer can show yours);
2. a BASE tiny Stage C trained from scratch on the 4 demo photographs and their captions (from the
   encoder cache, as demo.py does): it has never seen your photos;
3. a LoRA on that base (train/train_c_lora.py: every Linear/Conv of the attention and feed-forward
   blocks, rank 8) with the NEW token ``--token`` trained too, on your photos captioned
   "a photo of TOKEN";
4. samples of "a photo of TOKEN" from the base alone and from base + LoRA, the nearest photo (of all
   of them, pixel error at preview size) of each sample, and the grid OUT/lora_grid.png:
   your photos | Previewer(your photos) | base samples | base + LoRA samples.

What it prints: ``autoencoder PSNR`` (how well the Previewer shows a photo from its latent: the
best any sample can look), the LoRA's first/last training loss, and ``concept: K/N`` for the base
and for base + LoRA: how many of N samples of "a photo of TOKEN" have one of YOUR photos as their
nearest photo. The base should score near 0 (it only knows the demo photos); the LoRA should score
most of N: the learned concept (your photos, called by the token) is visible in its samples.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see core/cpu_threads.py

TOOL = "tools/lora_photos.py"
MAX_PHOTOS = 4
SIZE = 256                 # 8x8 Stage C latents, 64 px Previewer images (as the demo)
N_DEMO = 4                 # the demo's photographs the base model learns
SAMPLES = 4                # samples per model of "a photo of TOKEN"
SAMPLING = {"cfg": 2.0, "timesteps": 20}
_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_folder(folder: Path, size: int = SIZE):
    """Your photos as (N,3,size,size) in [0,1] (centre squares), sorted by name."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from core.errors import UserError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _EXTS) if folder.is_dir() else []
    if not files:
        raise UserError(f"{folder}: no photos ({', '.join(_EXTS)}) found")
    pics = []
    for path in files[:MAX_PHOTOS]:
        try:
            with Image.open(path) as im:
                pics.append(ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (size, size)))
        except OSError as exc:
            raise UserError(f"{path}: not a readable image ({exc})") from None
    array = np.stack([np.asarray(p) for p in pics])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255, [p.name for p in files[:MAX_PHOTOS]]


def write_dataset(folder: Path, images, captions: list[str], prefix: str) -> Path:
    """One tar shard of ``images`` with their captions."""
    import io

    from PIL import Image

    from tools.make_demo_assets import write_shards

    samples = []
    for i, (img, caption) in enumerate(zip(images, captions)):
        buf = io.BytesIO()
        Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(buf, format="JPEG", quality=95)
        samples.append({"__key__": f"{prefix}_{i:03d}", "jpg": buf.getvalue(), "txt": caption,
                        "json": {"width": SIZE, "height": SIZE}})
    write_shards(samples, folder, 1, prefix=prefix)
    return folder


def sample(generator_path: Path, assets: Path, prompt: str, lora: Path | None, seed: int):
    """SAMPLES Previewer images of ``prompt`` from the base generator (+ the LoRA and its token)."""
    from inference.sampling import from_preset
    from tools.demo_results import sample_captions

    settings = from_preset("stage_c_preview").replace(**SAMPLING)
    return sample_captions(generator_path, "tiny", assets / "clip" / "text", assets / "previewer.safetensors",
                           [prompt] * SAMPLES, (SIZE // 32, SIZE // 32), settings, seed=seed,
                           lora=lora)


def write_grid(path: Path, rows: list[tuple[str, object]], cell: int = 96) -> Path:
    """One labelled row of images per (label, (N,3,H,W) tensor)."""
    from PIL import Image, ImageDraw

    label_w, pad = 190, 4
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (cell + pad)
        draw.multiline_text((pad, y + 4), label, fill="black")
        for c, img in enumerate(images):
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(arr).resize((cell, cell), Image.NEAREST), (label_w + pad + c * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    return path


def _losses(run_dir: Path) -> list[float]:
    from core.logging import read_metrics

    return [float(r["loss"]) for r in read_metrics(str(run_dir / "metrics.jsonl")) if r.get("loss") is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", help=f"folder of your photos (the first {MAX_PHOTOS} by name are used)")
    parser.add_argument("--token", default="[mytok]", help="the new token that names your concept ([name] or <name>)")
    parser.add_argument("--out", default="runs/lora_photos", help="folder of assets, runs and the grid")
    parser.add_argument("--ae-steps", type=int, default=1000, help="autoencoder fit steps (Adam, all photos each)")
    parser.add_argument("--base-updates", type=int, default=3000, help="updates of the base Stage C")
    parser.add_argument("--lora-updates", type=int, default=1500, help="updates of the LoRA")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    import torch

    from core.config import load_config
    from core.errors import UserError
    from tools.cache_dataset import cache_dataset
    from tools.demo_results import retrieval
    from tools.make_demo_assets import PHOTOS, claim_folder, make_demo_models, photo_batch, read_marker, write_marker
    from train.train_c import StageCTrainer
    from train.train_c_lora import StageCLoraTrainer
    from inference.tokens import is_trigger

    if not is_trigger(args.token):
        raise UserError(f"--token {args.token!r}: a new token is written [name] or <name>, e.g. [mytok]")
    torch.set_num_threads(1)  # tiny networks: one thread is fastest (demo.py, measured)
    started = time.time()
    root = Path(__file__).resolve().parents[1]
    out = Path(args.out).resolve()
    assets = out / "assets"
    mine, names = load_folder(Path(args.photos))
    demo = photo_batch(N_DEMO, 1, SIZE)
    demo_captions = [c for _, c in PHOTOS[:N_DEMO]]
    prompt = f"a photo of {args.token}"

    # 1. assets (remade unless this tool made them from the same photos)
    marker = read_marker(assets)
    facts = {"photos": names, "ae_steps": args.ae_steps}
    if marker is not None and marker.get("made_by") == TOOL and {k: marker.get(k) for k in facts} == facts:
        psnr = marker["psnr_db"]
        print(f"[1/4] reusing the assets in {assets}/", flush=True)
    else:
        if marker is not None and marker.get("made_by") == TOOL:
            shutil.rmtree(assets)
        claim_folder(assets, TOOL)
        print(f"[1/4] fitting the encoder + Previewer on your {len(mine)} photo(s) and {N_DEMO} demo photos "
              f"({args.ae_steps} steps) in {assets}/ ...", flush=True)
        _, psnr = make_demo_models(assets, torch.cat([demo, mine]), args.ae_steps, batch_size=len(mine) + N_DEMO)
        write_dataset(assets / "base_shards", demo, demo_captions, "base")
        write_dataset(assets / "my_shards", mine, [prompt] * len(mine), "mine")
        write_marker(assets, TOOL, psnr_db=psnr, **facts)
    paths = {"effnet_checkpoint_path": assets / "effnet_encoder.safetensors",
             "previewer_checkpoint_path": assets / "previewer.safetensors",
             "clip_text_model_name": assets / "clip" / "text", "clip_image_model_name": assets / "clip" / "vision",
             "checkpoint_path": out / "checkpoints", "output_path": out / "output"}
    common = [f"{k}={v}" for k, v in paths.items()] + [f"seed={args.seed}", "image_size=256", "log_every=100",
                                                       "preview_every=0", "num_workers=0", "generator_dropout=0.0"]

    # 2. the base model: the demo's recipe on the demo photos only
    base_dir = out / "checkpoints" / "base"
    base_weights = base_dir / "generator_ema.safetensors"
    if not base_weights.is_file():
        print(f"[2/4] training the base tiny Stage C on the {N_DEMO} demo photos ({args.base_updates} updates)",
              flush=True)
        base_cfg = [*common, f"webdataset_path={assets / 'base_shards'}", f"cache_path={assets / 'base_cache'}",
                    "experiment_id=base", f"updates={args.base_updates}", f"save_every={args.base_updates}"]
        config = str(root / "configs/training/demo_c.yaml")
        cfg = load_config(StageCTrainer.Config, config, [o for o in base_cfg if not o.startswith("cache_path")],
                          validate_only=True)
        if not (assets / "base_cache").is_dir():
            cache_dataset(cfg, str(assets / "base_cache"), batch_size=N_DEMO, progress=False)
        StageCTrainer.main([config, *[x for o in base_cfg for x in ("--set", o)], "--resume", "never"])
    else:
        print(f"[2/4] reusing the base model {base_weights}", flush=True)

    # 3. the LoRA and its token on your photos
    lora_dir = out / "checkpoints" / "lora"
    shutil.rmtree(lora_dir, ignore_errors=True)
    print(f"[3/4] training a LoRA + the token {args.token} on your photos ({args.lora_updates} updates)", flush=True)
    lora_cfg = [*common, f"webdataset_path={assets / 'my_shards'}", f"generator_checkpoint_path={base_weights}",
                "experiment_id=lora", "log_every=10", f"updates={args.lora_updates}", f"save_every={args.lora_updates}",
                f"train_tokens=[['{args.token}', '^photo</w>']]", "batch_size=4", "lr=3.0e-3", "rank=8",
                "module_filters=['.attn', '.channelwise', '.kv_mapper']", "crop=random", "text_dropout=0.0",
                "image_embed_prob=0.0", "warmup_updates=20", "save_official_layout=false", "export_comfyui=false"]
    StageCLoraTrainer.main([str(root / "configs/training/tiny_c_lora.yaml"),
                            *[x for o in lora_cfg for x in ("--set", o)], "--resume", "never"])

    # 4. samples, nearest photos, grid
    print(f"[4/4] sampling {SAMPLES} x '{prompt}' from the base and from base + LoRA", flush=True)
    lora_file = lora_dir / "lora.safetensors"
    base_s = sample(base_weights, assets, prompt, None, args.seed)
    lora_s = sample(base_weights, assets, prompt, lora_file, args.seed)
    photos = torch.cat([mine, demo])
    from tools.demo_results import reconstruct

    recon = reconstruct(paths["effnet_checkpoint_path"], paths["previewer_checkpoint_path"], mine)
    hits_base = sum(j < len(mine) for j in retrieval(base_s, photos))
    hits_lora = sum(j < len(mine) for j in retrieval(lora_s, photos))
    grid = write_grid(out / "lora_grid.png", [("your photos", mine), ("Previewer(your photo)", recon),
                                              (f"base:\n{prompt}", base_s), (f"base + LoRA:\n{prompt}", lora_s)])
    losses = _losses(lora_dir)
    k = max(1, min(50, len(losses) // 2))
    print(f"  autoencoder : reconstruction PSNR {psnr:.1f} dB (how well the Previewer shows a photo)")
    print(f"  LoRA loss   : first {k} updates {sum(losses[:k]) / k:.4f} -> last {k} {sum(losses[-k:]) / k:.4f}")
    print(f"  LoRA file   : {lora_file} (token {args.token}; sample it: python3 -m inference.sample ... --lora FILE)")
    print(f"  grid        : {grid} (your photos | Previewer(photo) | base samples | base + LoRA samples)")
    print(f"concept: base {hits_base}/{SAMPLES}, base + LoRA {hits_lora}/{SAMPLES} "
          f"(samples of '{prompt}' whose nearest photo is one of yours)")
    print(f"  time        : {time.time() - started:.0f} s")
    (out / "result.json").write_text(json.dumps({"psnr_db": psnr, "concept_base": hits_base,
                                                 "concept_lora": hits_lora, "samples": SAMPLES}) + "\n")
    return 0


if __name__ == "__main__":
    from core.errors import run_cli

    run_cli(main)
