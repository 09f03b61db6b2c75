"""Stage C encoder cache: the frozen encoders' outputs, written once, trained on many times.

Why: a Stage C step spends memory and time on CLIP bigG (0.7B), CLIP ViT-L (0.3B) and the
EfficientNet, whose outputs never change. ``tools/cache_dataset.py`` runs them once over a dataset
and writes tensor shards; a run with ``cache_path`` reads them through ``core.data`` (same shard
plan, per-epoch shuffle, rank/worker split, block shuffle and exact resume as image shards) and
never builds the encoders.

Folder layout (``cache_path``):

* ``cache-NNNNNN.tar``: webdataset shards written by ``core.data.ShardWriter``; one sample =
  ``KEY.tensors.safetensors`` (``latents`` (16, h/32, w/32) EfficientNet latents at the bucket
  size the sample got, ``clip_text`` (77, C), ``clip_text_pooled`` (1, P), and ``clip_img`` (1, I)
  when the CLIP vision model ran), ``KEY.txt`` (the caption that was encoded) and ``KEY.json``
  (key, source url, bucket [h, w]). Samples of one bucket share latent shapes, and the data layer
  batches only samples of equal shapes;
* ``uncond.safetensors``: CLIP of the empty caption (what caption dropout swaps in);
* ``cache.json``: the manifest (format, sample count, shard names, encoders, dtypes), written
  last, so a folder without it is an unfinished cache run.

Exactness: the conditions are rebuilt with the SAME per-sample random draws as the image path
(``StageCTrainer.get_conditions``: text kept iff rand > text_dropout, then image embedding used iff
rand > 1 - image_embed_prob, both from the sample's generator), so a cached run gives the same
loss as the image run for the same samples. What a cache freezes: the crop/bucket choice of each
image (made once, when caching) -- augmentation that the image path re-draws every epoch.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from core.errors import UserError

log = logging.getLogger("train.stage_c_cache")

SHARD_PREFIX = "cache"
UNCOND_FILE = "uncond.safetensors"
MANIFEST_FILE = "cache.json"
FORMAT = 2          # 1: the former tarfile-written layout (same members; readable, no "format" key)
FIELDS = ("latents", "clip_text", "clip_text_pooled", "clip_img")


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_batch(images: torch.Tensor, captions: Sequence[str], effnet: torch.nn.Module, tokenizer: Any,
                 text_model: Any, vision_model: Any = None) -> dict[str, torch.Tensor]:
    """The frozen encoders' outputs for one batch, exactly as the Stage C trainer computes them
    (latents: effnet of ImageNet-normalised float32 images; CLIP text with the attention mask)."""
    from modules.conditioning import encode_images_clip, encode_text
    from modules.effnet import imagenet_normalize

    device = next(effnet.parameters()).device
    images = images.to(device)
    out = {"latents": effnet(imagenet_normalize(images.float())).float()}
    out["clip_text"], out["clip_text_pooled"] = encode_text(tokenizer, text_model, list(captions))
    if vision_model is not None:
        out["clip_img"] = encode_images_clip(vision_model, images)
    return out


@torch.no_grad()
def encode_unconditional(tokenizer: Any, text_model: Any) -> dict[str, torch.Tensor]:
    """CLIP of the empty caption: the dropped / unconditional text condition (a real CLIP output)."""
    from modules.conditioning import encode_text

    text, pooled = encode_text(tokenizer, text_model, [""])
    return {"clip_text": text[0], "clip_text_pooled": pooled[0]}


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
class CacheWriter:
    """Writes cached samples into ``out_dir/cache-NNNNNN.tar`` shards of ``shard_size`` samples
    (through ``core.data.ShardWriter``: whole shards only, even when interrupted), then the
    unconditional embedding and the manifest on :meth:`close`."""

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 1000, dtype: Optional[torch.dtype] = None):
        from core.data import ShardWriter

        self.out_dir = Path(out_dir)
        self.dtype = dtype
        self._shards = ShardWriter(self.out_dir, prefix=SHARD_PREFIX, shard_size=shard_size)

    @property
    def count(self) -> int:
        return self._shards.count

    @property
    def shards(self) -> list[str]:
        return self._shards.shards

    def _cast(self, tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
        """``tensors`` in the cache's dtype; UserError naming the sample and tensor when one is not
        finite (a cache never holds a NaN: training on it would stop far from the cause)."""
        from fileio.finite import first_nonfinite_tensor

        out = tensors if self.dtype is None else {k: v.to(self.dtype) for k, v in tensors.items()}
        bad = first_nonfinite_tensor(out)
        if bad is not None:
            from core.errors import UserError

            raise UserError(f"cache {self.out_dir}: not written: sample '{key}': encoded tensor '{bad}' holds NaN or "
                            f"infinite values{'' if self.dtype is None else f' as {self.dtype}'} (check that image "
                            f"and the encoders; a float16 cache overflows beyond 65504)")
        return out

    def add(self, key: str, tensors: dict[str, torch.Tensor], caption: str, meta: Optional[dict] = None) -> None:
        """Add one sample (per-sample tensors, no batch dimension)."""
        from core.data import TENSORS_EXT, encode_tensors

        self._shards.add(key, {TENSORS_EXT: encode_tensors(self._cast(tensors, key)), "txt": caption.encode("utf-8"),
                               "json": json.dumps({"key": key, **(meta or {})}).encode("utf-8")})

    def add_batch(self, batch: dict, encoded: dict[str, torch.Tensor]) -> None:
        """Add every sample of a data-layer batch with its ``encode_batch`` outputs."""
        urls = batch.get("urls") or [None] * len(batch["captions"])
        h, w = batch["images"].shape[-2:]
        for i, key in enumerate(batch["keys"]):
            self.add(str(key), {k: v[i] for k, v in encoded.items()}, batch["captions"][i],
                     {"url": urls[i], "bucket": [int(h), int(w)]})

    def close(self, uncond: dict[str, torch.Tensor], manifest: Optional[dict] = None) -> dict:
        """Finish the last shard, write the unconditional embedding, then the manifest (last: its
        presence marks a complete cache). Returns the manifest."""
        from core.data import encode_tensors

        self._shards.close()
        (self.out_dir / UNCOND_FILE).write_bytes(encode_tensors(self._cast(uncond, UNCOND_FILE)))
        info = {"format": FORMAT, "samples": self.count, "shards": list(self.shards), **(manifest or {})}
        tmp = self.out_dir / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
        os.replace(tmp, self.out_dir / MANIFEST_FILE)
        return info


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def read_manifest(cache_path: str | os.PathLike) -> dict:
    """The cache's ``cache.json``; a UserError naming the folder when it is not a complete cache."""
    folder = Path(cache_path)
    if not folder.is_dir():
        raise UserError(f"cache_path {cache_path}: folder not found (write it with python3 tools/cache_dataset.py)")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"cache_path {cache_path}: no {MANIFEST_FILE}, so not a finished cache written by "
                        f"tools/cache_dataset.py; (re-)run it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cache_path {cache_path}: {MANIFEST_FILE} is unreadable ({e}); re-run tools/cache_dataset.py")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"cache_path {cache_path}: {MANIFEST_FILE} lists no shards; re-run tools/cache_dataset.py")
    fmt = manifest.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > FORMAT:
        raise UserError(f"cache_path {cache_path}: cache format {fmt!r} is not one this code reads (<= {FORMAT}); "
                        f"re-cache with tools/cache_dataset.py")
    return manifest


def cache_shards(cache_path: str | os.PathLike) -> list[str]:
    """Paths of the cache's shards, as listed by its manifest (every one must exist)."""
    manifest = read_manifest(cache_path)
    shards = [os.path.join(os.path.abspath(cache_path), str(name)) for name in manifest["shards"]]
    if not shards or not manifest.get("samples", 1):
        raise UserError(f"cache_path {cache_path}: the cache holds no samples; re-run tools/cache_dataset.py "
                        f"on a non-empty dataset")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise UserError(f"cache_path {cache_path}: {len(missing)} shard(s) listed in {MANIFEST_FILE} are missing "
                        f"(first: {os.path.basename(missing[0])}); re-run tools/cache_dataset.py")
    return shards


def load_unconditional(cache_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The cached CLIP('') embeddings: ``clip_text`` (77, C) and ``clip_text_pooled`` (1, P)."""
    from core.data import decode_tensors
    from core.data.tensors import BadTensors

    path = Path(cache_path) / UNCOND_FILE
    if not path.is_file():
        raise UserError(f"cache_path {cache_path}: {UNCOND_FILE} is missing; re-run tools/cache_dataset.py")
    try:
        uncond = decode_tensors(path.read_bytes())
    except BadTensors as e:
        raise UserError(f"cache_path {cache_path}: {UNCOND_FILE} is damaged ({e}); re-run tools/cache_dataset.py")
    missing = {"clip_text", "clip_text_pooled"} - set(uncond)
    if missing:
        raise UserError(f"cache_path {cache_path}: {UNCOND_FILE} lacks {sorted(missing)}; re-run tools/cache_dataset.py")
    return uncond


def build_cache_pipeline(cache_path: str | os.PathLike, batch_size: int, rank: int = 0, world_size: int = 1,
                         seed: int = 0, num_workers: int = 0, state: Optional[dict] = None, *,
                         shuffle_buffer: int = 690, strict: bool = False) -> Any:
    """Training batches of one rank from a cache folder: a ``core.data`` tensor pipeline.

    Batches: ``latents``, ``clip_text``, ``clip_text_pooled``, ``clip_img`` (when cached), stacked
    in their stored dtype; ``captions``, ``keys``, ``urls``, ``json`` (lists) and ``epoch``. One
    latent size per batch. ``state_dict()`` / ``state=`` resume exactly; ``close()`` stops workers.
    """
    from core.data import DataConfig, build_pipeline

    shards = cache_shards(cache_path)
    if state and "version" not in state and "position" in state:
        # the former reader's position (a sample count in file order) means nothing to the new order
        log.warning("cache_path %s: the saved data position is from the former cache reader; starting a "
                    "fresh epoch", cache_path)
        state = None
    cfg = DataConfig(webdataset_path=shards, shuffle_buffer=shuffle_buffer, strict=strict, num_workers=num_workers)
    return build_pipeline(cfg, batch_size, rank=rank, world_size=world_size, seed=seed, num_workers=num_workers,
                          state=state, sample_format="tensors")


# ------------------------------------------------------------------------------------------------
# Conditions from a cached batch (same draws as the image path)
# ------------------------------------------------------------------------------------------------
def cached_conditions(batch: dict, uncond: dict[str, torch.Tensor], generators: Sequence[torch.Generator],
                      text_dropout: float, image_embed_prob: float, c_img: int,
                      device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None) -> dict:
    """Stage C conditions of a cached training batch, with the draws of the image path
    (:func:`train.stage_c_conditions.condition_dropout`): a dropped caption gets CLIP('') from the
    cache's side file, an unused image embedding zeros."""
    from train.stage_c_conditions import condition_dropout

    text = batch["clip_text"].clone()
    pooled = batch["clip_text_pooled"].clone()
    n = len(text)
    if len(generators) != n:
        raise ValueError(f"cached_conditions: {len(generators)} generators for {n} samples")
    clip_img = torch.zeros(n, 1, c_img, dtype=text.dtype)
    drop, use_img = condition_dropout(list(generators), text_dropout, image_embed_prob)
    for i in range(n):
        if drop[i]:
            text[i] = uncond["clip_text"].to(text.dtype)
            pooled[i] = uncond["clip_text_pooled"].to(pooled.dtype)
        if use_img[i]:
            if "clip_img" not in batch:
                raise UserError("the cache has no image embeddings (cached without the CLIP vision model) but "
                                "image_embed_prob > 0; re-cache with the vision model or set image_embed_prob: 0")
            clip_img[i] = batch["clip_img"][i].to(clip_img.dtype)
    out = {"clip_text": text, "clip_text_pooled": pooled, "clip_img": clip_img}
    return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in out.items()}


__all__ = ["CacheWriter", "FIELDS", "FORMAT", "MANIFEST_FILE", "SHARD_PREFIX", "UNCOND_FILE", "build_cache_pipeline",
           "cache_shards", "cached_conditions", "encode_batch", "encode_unconditional", "load_unconditional",
           "read_manifest"]
