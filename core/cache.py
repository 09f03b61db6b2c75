"""Cache of the frozen encoders' outputs: write once, train many times without loading them.

Why: a Stage C step spends memory and time on CLIP bigG (0.7B), CLIP ViT-L (0.3B) and the
EfficientNet, whose outputs never change. ``tools/cache_dataset.py`` runs them once over a dataset
and writes webdataset shards; a run with ``cache_path`` reads those shards and never builds the
encoders.

Shard layout (plain tar, one sample = files sharing a key):

* ``KEY.tensors.safetensors``: ``latents`` (16, h/32, w/32) EfficientNet latents at the bucket size
  the sample got, ``clip_text`` (77, C), ``clip_text_pooled`` (1, P), and ``clip_img`` (1, I) when
  the image encoder ran (Stage B caches may carry ``images_small`` etc. in the future);
* ``KEY.txt``: the caption that was encoded; ``KEY.json``: key, source url, bucket (h, w).

Next to the shards: ``uncond.safetensors`` (CLIP of the empty caption: what caption dropout swaps
in) and ``cache.json`` (encoders, dtype, counts).

Exactness: the conditions are rebuilt with the SAME per-sample random draws as the image path
(``train_c.StageCTrainer.get_conditions``: text kept iff rand > text_dropout, then image embedding
used iff rand > 1 - image_embed_prob, both from the sample's generator), so a cached run gives the
same loss as the image run for the same samples. What a cache freezes: the crop/bucket choice of
each image (made once, when caching) -- augmentation that the image path re-draws every epoch.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

TENSORS_EXT = "tensors.safetensors"
UNCOND_FILE = "uncond.safetensors"
MANIFEST_FILE = "cache.json"
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
def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def _tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


class CacheWriter:
    """Writes cached samples into ``out_dir/cache-NNNNNN.tar`` shards of ``shard_size`` samples.

    Each shard is written to a temporary name and renamed when complete, so an interrupted cache
    run never leaves a truncated shard that a reader would accept.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 1000, dtype: Optional[torch.dtype] = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = int(shard_size)
        self.dtype = dtype
        self.count = 0
        self.shards: list[str] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._in_shard = 0
        self._tmp = ""

    def _add_file(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]

    def add(self, key: str, tensors: dict[str, torch.Tensor], caption: str, meta: Optional[dict] = None) -> None:
        """Add one sample (per-sample tensors, no batch dimension)."""
        if self._tar is None:
            name = f"cache-{len(self.shards):06d}.tar"
            self._tmp = str(self.out_dir / (name + ".tmp"))
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append(name)
        if self.dtype is not None:
            tensors = {k: v.to(self.dtype) for k, v in tensors.items()}
        self._add_file(f"{key}.{TENSORS_EXT}", _tensor_bytes(tensors))
        self._add_file(f"{key}.txt", caption.encode("utf-8"))
        self._add_file(f"{key}.json", json.dumps({"key": key, **(meta or {})}).encode("utf-8"))
        self.count += 1
        self._in_shard += 1
        if self._in_shard >= self.shard_size:
            self._close_shard()

    def add_batch(self, batch: dict, encoded: dict[str, torch.Tensor]) -> None:
        """Add every sample of a data-layer batch with its ``encode_batch`` outputs."""
        urls = batch.get("urls") or [None] * len(batch["captions"])
        for i, key in enumerate(batch["keys"]):
            tensors = {k: v[i] for k, v in encoded.items()}
            h, w = batch["images"].shape[-2:]
            self.add(str(key), tensors, batch["captions"][i], {"url": urls[i], "bucket": [int(h), int(w)]})

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self._tmp[:-len(".tmp")])
            self._tar, self._in_shard = None, 0

    def close(self, uncond: dict[str, torch.Tensor], manifest: Optional[dict] = None) -> None:
        """Finish the last shard, write the unconditional embedding and the manifest."""
        self._close_shard()
        data = _tensor_bytes(uncond if self.dtype is None else {k: v.to(self.dtype) for k, v in uncond.items()})
        (self.out_dir / UNCOND_FILE).write_bytes(data)
        info = {"samples": self.count, "shards": self.shards, **(manifest or {})}
        (self.out_dir / MANIFEST_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def load_unconditional(cache_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(cache_path) / UNCOND_FILE
    if not path.is_file():
        from core.errors import UserError

        raise UserError(f"cache_path {cache_path}: {UNCOND_FILE} is missing; re-run tools/cache_dataset.py")
    return _tensors_from_bytes(path.read_bytes())


def cache_shards(cache_path: str | os.PathLike) -> list[Path]:
    shards = sorted(Path(cache_path).glob("cache-*.tar"))
    if not shards:
        from core.errors import UserError

        raise UserError(f"cache_path {cache_path}: no cache-*.tar shards; run tools/cache_dataset.py first")
    return shards


def iter_cached_samples(shards: Iterable[Path]) -> Iterator[dict]:
    """Samples of the shards in file order: ``{'key', 'caption', 'json', **tensors}``."""
    for shard in shards:
        current: dict[str, Any] = {}
        with tarfile.open(shard, "r") as tf:
            for member in tf:
                key, _, ext = member.name.partition(".")
                if current and current["key"] != key:
                    yield current
                    current = {}
                current["key"] = key
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                if ext == TENSORS_EXT:
                    current.update(_tensors_from_bytes(data))
                elif ext == "txt":
                    current["caption"] = data.decode("utf-8")
                elif ext == "json":
                    current["json"] = json.loads(data)
        if current:
            yield current


class CachedPipeline:
    """Training batches from cache shards, like ``core.data.build_pipeline`` for images.

    Samples are split over ranks by index (sample i goes to rank i % world_size), grouped by
    latent size (one bucket per batch, first full bucket wins, like the image path), and the
    dataset repeats. ``state_dict()`` gives the position for an exact resume. Batches:
    ``{'latents', 'clip_text', 'clip_text_pooled', ['clip_img'], 'captions', 'keys', 'json'}``.
    """

    def __init__(self, cache_path: str | os.PathLike, batch_size: int, rank: int = 0, world_size: int = 1,
                 state: Optional[dict] = None):
        self.shards = cache_shards(cache_path)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.position = int((state or {}).get("position", 0))  # samples consumed by this rank

    def state_dict(self) -> dict:
        return {"position": self.position}

    def stats(self) -> dict:
        return {"position": self.position}

    def _own_samples(self) -> Iterator[dict]:
        skip, epoch = self.position, 0
        while True:
            seen = 0
            for i, sample in enumerate(iter_cached_samples(self.shards)):
                if i % self.world_size != self.rank:
                    continue
                seen += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield sample
            if seen == 0:
                from core.errors import UserError

                raise UserError(f"cache has no samples for rank {self.rank} of {self.world_size}")
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        buckets: dict[tuple, list[dict]] = {}
        pending = 0   # samples read into buckets but not yet emitted (position counts emitted ones)
        for sample in self._own_samples():
            bucket = buckets.setdefault(tuple(sample["latents"].shape), [])
            bucket.append(sample)
            pending += 1
            if len(bucket) >= self.batch_size:
                items = bucket[:self.batch_size]
                del bucket[:self.batch_size]
                pending -= len(items)
                self.position += len(items)
                yield collate(items)

    def close(self) -> None:
        pass


def collate(items: list[dict]) -> dict:
    batch: dict[str, Any] = {k: torch.stack([s[k] for s in items]) for k in FIELDS if k in items[0]}
    batch["captions"] = [s.get("caption", "") for s in items]
    batch["keys"] = [s["key"] for s in items]
    batch["json"] = [s.get("json") for s in items]
    return batch


# ------------------------------------------------------------------------------------------------
# Conditions from a cached batch (same draws as the image path)
# ------------------------------------------------------------------------------------------------
def cached_conditions(batch: dict, uncond: dict[str, torch.Tensor], generators: Sequence[torch.Generator],
                      text_dropout: float, image_embed_prob: float, c_img: int,
                      device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None) -> dict:
    """Stage C conditions of a cached training batch: per sample, from its generator, text kept iff
    rand > text_dropout (else CLIP('') from the cache's side file), then the image embedding used iff
    rand > 1 - image_embed_prob (else zeros). Same order and comparisons as the image path."""
    text = batch["clip_text"].clone()
    pooled = batch["clip_text_pooled"].clone()
    n = len(text)
    assert len(generators) == n
    clip_img = torch.zeros(n, 1, c_img, dtype=text.dtype)
    for i, g in enumerate(generators):
        if torch.rand(1, generator=g).item() <= text_dropout:
            text[i] = uncond["clip_text"].to(text.dtype)
            pooled[i] = uncond["clip_text_pooled"].to(pooled.dtype)
        if torch.rand(1, generator=g).item() > 1.0 - image_embed_prob:
            if "clip_img" not in batch:
                from core.errors import UserError

                raise UserError("the cache has no image embeddings (cached without the CLIP vision model) but "
                                "image_embed_prob > 0; re-cache with the vision model or set image_embed_prob: 0")
            clip_img[i] = batch["clip_img"][i].to(clip_img.dtype)
    out = {"clip_text": text, "clip_text_pooled": pooled, "clip_img": clip_img}
    return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in out.items()}


__all__ = ["CacheWriter", "CachedPipeline", "cached_conditions", "encode_batch", "encode_unconditional",
           "load_unconditional", "iter_cached_samples", "cache_shards", "collate"]
