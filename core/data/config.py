"""``DataConfig``: the data keys of a training YAML, flat, with the YAML names."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .buckets import BucketTable
from .captions import TagOptions, make_caption_getter, make_tag_options
from .errors import DataError
from .filters import parse_filters
from .images import DEFAULT_MAX_PIXELS, PIL_MAX_PIXELS


#: values of the ``crop`` key
CROPS = ("auto", "random", "center", "smart")


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


# Upper bounds of counts whose absurd values fail late or exhaust the machine; the messages say why.
MAX_IMAGE_SIZE = 8192          # a decoded 8192² RGB image is already 0.8 GB as float32
MAX_SHUFFLE_BUFFER = 100_000   # every buffered sample keeps its encoded files in memory, per worker


def _doc(default: Any, text: str) -> Any:
    """A field with its description in ``metadata["doc"]`` (same convention as ``core.config``)."""
    return field(default=default, metadata={"doc": text})


@dataclass
class DataConfig:
    """Everything the data layer reads from the training config (keys as in the YAML).

    Each field carries its description in ``metadata["doc"]`` (the convention of ``core.config``),
    so the config reference can be generated from it.
    """

    webdataset_path: Any = _doc(
        None, "Dataset location(s): one entry or a list. Each entry is `file:/x.tar`, a plain path, a "
              "directory of shards (its `*.tar`, sorted), a brace pattern `shard-{0000..0099}.tar`, "
              "`s3://bucket/prefix/x.tar`, `s3://bucket/prefix/` (every `.tar` key under it) or a "
              "`.yml`/`.yaml` file holding a list of such entries. S3 uses boto3 (AWS_ENDPOINT_URL "
              "and the standard AWS credentials). `http://` / `https://` shard URLs (brace patterns "
              "work; extra headers such as a token from CASCADE_HTTP_HEADERS, a JSON object). A "
              "directory without `.tar` files is a plain image folder: `NAME.jpg|png|webp` + "
              "`NAME.txt` (+ `NAME.json`), sub-folders included, read as it is.")
    dataset_filters: Optional[list] = _doc(
        None, "Filters on the `.json` metadata: `[key, 'lambda s: s > 4.5']` (parsed, never run as "
              "code: one comparison/boolean expression over the argument and literals) or "
              "`[key, '>', 4.5]`. A sample is kept only if every rule holds; one lacking the key "
              "is dropped and counted.")
    captions_getter: Optional[list] = _doc(
        None, "Official caption selector `[wds_key, function]`: `['txt', identity]` or "
              "`['json', captions_getter]` (json `caption`, or 5 % of the time the `og_caption` "
              "inside `old_caption`). None = the `.txt` text.")
    caption_key: Optional[str] = _doc(
        None, "Simpler caption selector: `'txt'` or `'json:<field>'`; ignored when captions_getter is set.")
    caption_tag_shuffle: bool = _doc(
        False, "Shuffle the comma-separated tags of each caption every time the sample is read "
               "(booru/tag captions): the model stops depending on tag order. Drawn per sample from "
               "its identity, so runs and resumes repeat.")
    caption_keep_tags: int = _doc(
        0, "Keep the first N tags of each caption in place, never shuffled or dropped (e.g. 1 for "
           "the trigger word of a LoRA, so it stays first and always present).")
    caption_tag_dropout: float = _doc(
        0.0, "Drop each tag after the kept ones with this probability in [0, 1): the subject no "
             "longer needs every tag of its training captions to appear.")
    multi_aspect_ratio: Optional[list] = _doc(
        None, "Width/height ratios (`'9/16'` strings or numbers) for multi-aspect-ratio bucketing "
              "(reciprocals are added); None = fixed square `image_size` training.")
    image_size: int = _doc(768, f"Square training size, or the bucket area `image_size**2` when bucketing; 32 to {MAX_IMAGE_SIZE}.")
    crop: str = _doc(
        "auto", "Crop after resizing: `random`, `center`, `smart` (the official SmartCrop: centred on "
                "the salient part of the image, computed by the saliency network of "
                "`saliency_model_path`; docs/OFFICIAL.md, Data) or `auto` (default): `smart` for fixed-size "
                "training when `saliency_model_path` is set, `random` with `multi_aspect_ratio` (the "
                "official bucketing) or when it is null.")
    bucket_random_ratio: float = _doc(
        0.05, "Probability that an image goes to a uniformly random bucket (official 0.05; the "
              "official name `bucketeer_random_ratio` is accepted too).")
    shuffle_buffer: int = _doc(
        690, f"Samples per shuffle block (official buffer 690): each block read is permuted; at most {MAX_SHUFFLE_BUFFER}.")
    num_workers: int = field(default_factory=_default_workers, metadata={"doc": (
        "DataLoader worker processes per rank (default min(4, CPUs); 0 = decode in the main process; at most "
        "the machine's CPU count).")})
    strict: bool = _doc(
        False, "Make bad data fatal (undecodable or oversized image, missing image or caption, "
               "truncated or malformed tar, missing shard) instead of skipping and reporting it.")
    resampled: bool = _doc(
        False, "false: epochs, every sample exactly once per epoch across ranks and workers. true: "
               "the official endless stream drawing shards with replacement per worker.")
    report_every: int = _doc(1000, "Batches between two logged bad-data summaries (also logged at close).")
    max_image_pixels: int = _doc(
        DEFAULT_MAX_PIXELS, "Largest image (width x height, read from the header before decoding) "
                            "that is decoded; a larger one is bad data (`oversized_image`, skipped "
                            "and reported, fatal with `strict`). At most 268435456 (PIL's "
                            "decompression-bomb limit).")

    @classmethod
    def from_dict(cls, data: dict, ignore_unknown: bool = True) -> "DataConfig":
        """Build from a (training) config dict, taking only the data keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        if "bucketeer_random_ratio" in data and "bucket_random_ratio" not in data:
            # the official code's (unsettable) name for the same probability
            data["bucket_random_ratio"] = data.pop("bucketeer_random_ratio")
        unknown = set(data) - names
        if unknown and not ignore_unknown:
            raise DataError(f"unknown data config keys: {sorted(unknown)}")
        cfg = cls(**{k: v for k, v in data.items() if k in names})
        cfg.validate()
        return cfg

    def validate(self) -> "DataConfig":
        """Check every key; raise DataError naming the first bad one. Returns self."""
        DataConfig.validate_data(self, require_path=True)
        return self

    def validate_data(self, require_path: bool = False) -> None:
        """The data keys' checks (``validate_<component>`` hook of composed configs such as
        ``core.training.TrainingConfig``; there ``webdataset_path`` may be unset, e.g. for jobs
        reading cached latents). No file system or network access."""
        wp = self.webdataset_path
        if wp is None and not require_path:
            pass
        elif not wp or not (isinstance(wp, str) or (isinstance(wp, (list, tuple))
                                                    and all(isinstance(x, str) and x for x in wp))):
            raise DataError(f"webdataset_path: expected a path/URL or a list of them, got {wp!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 32:
            raise DataError(f"image_size: expected an integer >= 32, got {self.image_size!r}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise DataError(f"image_size: {self.image_size} is above {MAX_IMAGE_SIZE}: one decoded "
                            f"{MAX_IMAGE_SIZE}x{MAX_IMAGE_SIZE} RGB image already takes 0.8 GB as float32 "
                            f"(the official configs train at 768-1024)")
        if self.crop not in CROPS:
            raise DataError(f"crop: expected one of {', '.join(CROPS)}, got {self.crop!r}")
        v = self.bucket_random_ratio
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise DataError(f"bucket_random_ratio: expected a probability in [0, 1], got {v!r}")
        for key, lo in (("shuffle_buffer", 1), ("num_workers", 0), ("report_every", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise DataError(f"{key}: expected an integer >= {lo}, got {v!r}")
        v = self.max_image_pixels
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= PIL_MAX_PIXELS:
            raise DataError(f"max_image_pixels: expected an integer in [1, {PIL_MAX_PIXELS}] (above "
                            f"that PIL refuses the image as a decompression bomb), got {v!r}")
        cpus = os.cpu_count() or 1
        if self.num_workers > cpus:
            raise DataError(f"num_workers: {self.num_workers} worker processes per rank is more than this "
                            f"machine's {cpus} CPUs (each worker is a process decoding images); use at most "
                            f"{cpus}, or 0 to decode in the main process")
        if self.shuffle_buffer > MAX_SHUFFLE_BUFFER:
            raise DataError(f"shuffle_buffer: {self.shuffle_buffer} is above {MAX_SHUFFLE_BUFFER}: every "
                            f"buffered sample keeps its encoded files in memory in each worker")
        for key in ("strict", "resampled"):
            if not isinstance(getattr(self, key), bool):
                raise DataError(f"{key}: expected true or false, got {getattr(self, key)!r}")
        if self.multi_aspect_ratio is not None:
            if not isinstance(self.multi_aspect_ratio, (list, tuple)) or not self.multi_aspect_ratio:
                raise DataError(f"multi_aspect_ratio: expected a list of ratios like '9/16', "
                                f"got {self.multi_aspect_ratio!r}")
        self.bucket_table()
        parse_filters(self.dataset_filters)
        make_caption_getter(self.captions_getter, self.caption_key, self.tag_options())

    def tag_options(self) -> TagOptions | None:
        """The caption tag handling of the ``caption_*tag*`` keys (None: captions unchanged)."""
        return make_tag_options(self.caption_tag_shuffle, self.caption_keep_tags, self.caption_tag_dropout)

    def bucket_table(self, image_size: int | None = None) -> BucketTable:
        """The bucket table this config trains with (one square bucket without ratios)."""
        return BucketTable(image_size or self.image_size, self.multi_aspect_ratio,
                           self.bucket_random_ratio)
