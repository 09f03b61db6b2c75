"""Regularization (class / prior-preservation) images for the Stage C jobs (docs/LORA.md).

Each rank's micro-batch of ``B`` samples is made of ``B - k`` samples of ``webdataset_path`` and
``k = round(regularization_share * B)`` (halves round up) samples of ``regularization_webdataset_path`` (1 <= k <= B - 1,
checked when the pipeline is built, before any model loads). The two come from two data pipelines
of the same rank, each with its own shard plan, per-epoch shuffle, rank/worker split, full
batches and saved position, so multi-process runs get full equal-size batches on every rank and a
resume continues both exactly. The regularization pipeline uses the same data keys (captions, tag
handling, buckets, crop) except ``dataset_filters`` (class images usually carry no metadata).

Bucketing: the two parts are bucketed independently; when their sizes differ, the regularization
images are resized (aspect kept, covering) and center-cropped to the main part's bucket, so the
micro-batch stays one tensor of one size and goes through the network in one forward.

Loss: the per-sample losses of the regularization samples are multiplied by
``regularization_weight``; the batch loss stays the mean over all ``B`` samples (kohya's
``prior_loss_weight``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from core.config import doc
from core.errors import UserError

__all__ = ["RegularizationConfig", "MixedPipeline", "regularization_count", "build_mixed_pipeline",
           "regularized_loss", "REG_KEY"]

#: the key of a main batch holding its regularization part
REG_KEY = "regularization"


@dataclass
class RegularizationConfig:
    """Keys of the regularization images (Stage C jobs)."""

    regularization_webdataset_path: Any = doc(
        None, "Regularization (class) images, any form webdataset_path takes: e.g. photos of 'a woman' captioned so, "
              "so that a subject LoRA trained on 'ohwx woman' does not turn every woman into the subject (prior "
              "preservation). None = no regularization.")
    regularization_share: float = doc(
        0.5, "Share of each rank's micro-batch taken from the regularization images: round(share x per-rank batch) "
             "samples, at least 1 and at most per-rank batch - 1 (e.g. 0.5 of 4 = 2 regularization + 2 training images).")
    regularization_weight: float = doc(
        1.0, "Multiplies the loss of the regularization samples (kohya's prior_loss_weight): lower it (e.g. 0.5) when "
             "the subject learns too slowly, raise it when the class still drifts.")

    def validate_regularization(self) -> None:
        wp = self.regularization_webdataset_path
        if wp is not None and (not wp or not (isinstance(wp, str) or (
                isinstance(wp, (list, tuple)) and all(isinstance(x, str) and x for x in wp)))):
            raise UserError(f"config key 'regularization_webdataset_path': expected a path/URL or a list of them, got {wp!r}")
        if not 0.0 < self.regularization_share < 1.0:
            raise UserError(f"config key 'regularization_share' must be in (0, 1), got {self.regularization_share}")
        if not self.regularization_weight >= 0.0:
            raise UserError(f"config key 'regularization_weight' must be >= 0, got {self.regularization_weight}")
        if wp is not None and getattr(self, "cache_path", None):
            raise UserError("config key 'regularization_webdataset_path' does not combine with 'cache_path' (the "
                            "encoder cache holds one dataset); remove one of the two keys")


def regularization_count(share: float, per_rank_batch: int) -> int:
    """``k``: the regularization samples of a per-rank micro-batch; UserError when none or all would be."""
    k = int(math.floor(share * per_rank_batch + 0.5))  # half up (Python's round() halves to even)
    if not 1 <= k <= per_rank_batch - 1:
        raise UserError(f"config key 'regularization_share' = {share} of a per-rank micro-batch of {per_rank_batch} "
                        f"gives {k} regularization sample(s); it must give at least 1 and leave at least 1 training "
                        f"sample: raise batch_size or change the share")
    return k


class MixedPipeline:
    """Zips a main and a regularization pipeline: each batch is the main part with the
    regularization part under :data:`REG_KEY`; ``state_dict()`` holds both positions."""

    def __init__(self, main: Any, reg: Any) -> None:
        self.main, self.reg = main, reg
        self._it: Optional[tuple] = None

    def __iter__(self) -> "MixedPipeline":
        self._it = (iter(self.main), iter(self.reg))
        return self

    def __next__(self) -> dict:
        if self._it is None:
            iter(self)
        batch = next(self._it[0])
        batch[REG_KEY] = next(self._it[1])
        return batch

    def to_device(self, batch: dict, device: Any = None) -> dict:
        """Both parts ready to train on ``device`` (each pipeline converts its own images)."""
        self.reg.to_device(batch[REG_KEY], device)
        return self.main.to_device(batch, device)

    def state_dict(self) -> dict:
        return {"main": self.main.state_dict(), REG_KEY: self.reg.state_dict()}

    def stats(self) -> dict:
        return {**self.main.stats(), REG_KEY: self.reg.stats()}

    def close(self) -> None:
        for p in (self.main, self.reg):
            p.close()


def build_mixed_pipeline(cfg: Any, batch_size: int, state: Optional[dict], options: dict) -> MixedPipeline:
    """The two pipelines of one rank (``batch_size`` = the whole per-rank micro-batch; ``options``:
    the job's shared ``build_pipeline`` keywords: rank, seed, workers, image dtype, saliency)."""
    from core.data import DataConfig, build_pipeline

    k = regularization_count(cfg.regularization_share, batch_size)
    if state is not None and (not isinstance(state, dict) or set(state) != {"main", REG_KEY}):
        raise UserError("the checkpoint's data position was saved without regularization images; resume with the "
                        "same regularization_webdataset_path, or start a new run (experiment_id)")
    state = state or {}
    data_keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DataConfig)}
    reg_cfg = DataConfig(**{**data_keys, "webdataset_path": cfg.regularization_webdataset_path, "dataset_filters": None})
    main = build_pipeline(cfg, batch_size=batch_size - k, state=state.get("main"), **options)
    reg = build_pipeline(reg_cfg, batch_size=k, state=state.get(REG_KEY), source_key="regularization_webdataset_path",
                         **options)
    return MixedPipeline(main, reg)


def fit_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (aspect kept, covering ``size``) and center-crop a (N,3,h,w) batch to ``size``."""
    h, w = images.shape[-2:]
    if (h, w) == tuple(size):
        return images
    scale = max(size[0] / h, size[1] / w)
    nh, nw = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    resized = F.interpolate(images.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size[0]) // 2, (nw - size[1]) // 2
    return resized[..., top:top + size[0], left:left + size[1]].clamp(0, 1).to(images.dtype)


def merge_parts(batch: dict) -> tuple[dict, int]:
    """One batch of the main part followed by the regularization part (images fitted to the main
    part's size); returns it and the number of main samples."""
    reg = batch[REG_KEY]
    main = {k: v for k, v in batch.items() if k != REG_KEY}
    n_main = len(main["captions"])
    merged = {}
    for key, value in main.items():
        other = reg.get(key)
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
            if key in ("images", "masks"):  # the loss masks (train/masked_loss.py) are cut like their images
                other = fit_to(other, tuple(value.shape[-2:]))
            merged[key] = torch.cat([value, other.to(value.dtype)])
        elif isinstance(value, list) and isinstance(other, list):
            merged[key] = value + other
        else:
            merged[key] = value
    return merged, n_main


def regularized_loss(part_loss: Callable[..., tuple[torch.Tensor, torch.Tensor]], batch: dict,
                     generators: list[torch.Generator], weight: float) -> tuple[torch.Tensor, dict]:
    """The loss of a mixed batch: ``part_loss(batch, generators, sample_weight)`` once over the
    merged batch, the regularization samples weighted by ``weight``."""
    merged, n_main = merge_parts(batch)
    n = len(merged["captions"])
    sample_weight = torch.tensor([1.0] * n_main + [float(weight)] * (n - n_main))
    loss, per_sample = part_loss(merged, generators, sample_weight)
    return loss, {"raw_loss": per_sample.mean(), "reg_raw_loss": per_sample[n_main:].mean()}
