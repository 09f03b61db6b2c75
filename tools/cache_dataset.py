"""Run the frozen Stage C encoders once over a dataset and write cache shards (see train/stage_c_cache.py).

    python3 tools/cache_dataset.py configs/training/finetune_c_3b.yaml --out /data/cache_c \
        [--set image_size=1024] [--shard-size 1000] [--max-samples N] [--no-image-embeds] [--dtype bfloat16]

The training YAML gives the data (webdataset_path, buckets, filters, captions) and the encoders
(effnet_checkpoint_path, clip_text_model_name, clip_image_model_name). One pass over the dataset:
each sample is cached once, at the bucket size the data layer gives it. Caption dropout is NOT
applied here (the training run applies it, swapping in the cached CLIP('') embedding). The shards
are ordinary webdataset tar shards of tensor samples (written with core.data's ShardWriter), read
back by core.data's pipeline. Train from the cache with ``--set cache_path=/data/cache_c``.
"""
from __future__ import annotations

import argparse
import time
from typing import NoReturn

import torch


def build_encoders(cfg, device: torch.device, dtype: torch.dtype, image_embeds: bool) -> dict:
    """effnet (float32, like the trainer), tokenizer, CLIP text (and vision) in ``dtype``."""
    from modules.conditioning import load_clip_text, load_clip_vision, load_tokenizer
    from modules.loading import load_detected

    enc = {"effnet": load_detected("effnet", cfg.effnet_checkpoint_path, device=device).eval(),
           "tokenizer": load_tokenizer(cfg.clip_text_model_name),
           "text_model": load_clip_text(cfg.clip_text_model_name, dtype=dtype, device=device),
           "vision_model": None}
    if image_embeds:
        enc["vision_model"] = load_clip_vision(cfg.clip_image_model_name, dtype=dtype, device=device)
    return enc


def cache_dataset(cfg, out_dir: str, batch_size: int = 8, shard_size: int = 1000, max_samples: int | None = None,
                  image_embeds: bool = True, store_dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """One pass over ``cfg``'s dataset -> cache shards in ``out_dir``; returns the manifest.

    ``progress`` shows a tqdm bar of the samples cached (on stderr)."""
    from tqdm.auto import tqdm

    from core.data import build_pipeline
    from train.stage_c_cache import CacheWriter, encode_batch, encode_unconditional

    device = torch.device(device)
    model_dtype = getattr(torch, cfg.dtype) if cfg.dtype else torch.float32
    enc = build_encoders(cfg, device, model_dtype, image_embeds)
    # one pass: epoch 0's partial buckets come as short batches instead of waiting for epoch 1
    saliency = None
    if cfg.crop == "smart":  # the cache keeps the crops the training run would make
        from train.saliency import load_job_saliency

        saliency = load_job_saliency(cfg, "cpu")
    pipeline = build_pipeline(cfg, batch_size=batch_size, rank=0, world_size=1, seed=cfg.seed,
                              num_workers=cfg.num_workers, partial_batches=True, saliency=saliency,
                              masks=cfg.mask_mode())
    writer = CacheWriter(out_dir, shard_size=shard_size, dtype=store_dtype)
    seen: set[tuple[str, str]] = set()   # (shard url, key): keys repeat across shards
    started = time.perf_counter()
    bar = tqdm(total=max_samples, unit="sample", desc="caching", disable=not progress, dynamic_ncols=True)
    try:
        for batch in pipeline:
            if max_samples is not None and writer.count >= max_samples:
                break
            urls = batch.get("urls") or [""] * len(batch["keys"])
            # epoch mode: every sample of a later epoch was cached already; resampled mode has no
            # epochs, so it stops at the first batch that brings nothing new
            first_pass = cfg.resampled or batch["epoch"] == 0
            fresh = [i for i, k in enumerate(batch["keys"]) if first_pass and (urls[i], k) not in seen]
            if not fresh and cfg.resampled:
                break
            if max_samples is not None:
                fresh = fresh[:max_samples - writer.count]
            if fresh:
                sub = {"images": batch["images"][fresh], "captions": [batch["captions"][i] for i in fresh],
                       "keys": [batch["keys"][i] for i in fresh], "urls": [urls[i] for i in fresh]}
                encoded = encode_batch(sub["images"], sub["captions"], enc["effnet"], enc["tokenizer"],
                                       enc["text_model"], enc["vision_model"])
                if cfg.masked_loss:  # the mask at the latent grid (train/masked_loss.py)
                    from train.masked_loss import CACHE_MASK, latent_mask

                    masks = batch["masks"][fresh].float() / 255.0
                    encoded[CACHE_MASK] = latent_mask(masks, tuple(encoded["latents"].shape[-2:])).cpu()
                writer.add_batch(sub, encoded)
                seen.update(zip(sub["urls"], sub["keys"]))
                bar.update(len(fresh))
            if not cfg.resampled and pipeline.epoch >= 1:
                break  # every worker has finished epoch 0: each sample was cached once
    finally:
        bar.close()
        pipeline.close()
    manifest = {"kind": "stage_c", "effnet": cfg.effnet_checkpoint_path, "clip_text": cfg.clip_text_model_name,
                "clip_image": cfg.clip_image_model_name if image_embeds else None,
                "encoder_dtype": str(model_dtype).replace("torch.", ""),
                "store_dtype": str(store_dtype).replace("torch.", "") if store_dtype else "float32",
                "image_size": cfg.image_size, "masks": bool(cfg.masked_loss),
                "seconds": round(time.perf_counter() - started, 3)}
    return writer.close(encode_unconditional(enc["tokenizer"], enc["text_model"]), manifest)


def main(argv: list[str] | None = None) -> int:
    from core.config import load_config
    from train.train_c import StageCConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True, help="output folder of the cache shards")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--no-image-embeds", action="store_true", help="skip the CLIP vision model")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="storage dtype of the cached tensors (default: as computed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cfg = load_config(StageCConfig, args.config, args.overrides)
    info = cache_dataset(cfg, args.out, args.batch_size, args.shard_size, args.max_samples,
                         not args.no_image_embeds, getattr(torch, args.dtype) if args.dtype else None, args.device)
    print(f"cached {info['samples']} samples into {len(info['shards'])} shard(s) in {args.out} "
          f"({info['seconds']} s)")
    return 0


def cli() -> NoReturn:
    """The command line (console script ``cascade-cache-dataset``): ``error: ...`` and exit 2 on a user error."""
    from core.errors import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
