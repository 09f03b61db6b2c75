"""Data layer: webdataset shards (local / S3) -> filtered, captioned, bucketed batches.

Usable alone (imports nothing else from ``core``). Public API::

    from core.data import DataConfig, DataError, build_pipeline
    pipe = build_pipeline(DataConfig(webdataset_path="shards/", image_size=768), batch_size=8)
    batch = next(pipe)          # {'images', 'captions', 'keys', 'urls', 'json', 'epoch'}
    state = pipe.state_dict()   # JSON-able; build_pipeline(..., state=state) continues exactly

    # shards of precomputed tensors (KEY.tensors.safetensors + KEY.txt), batched by equal shapes
    pipe = build_pipeline("cache/", batch_size=8, sample_format="tensors")
    batch = next(pipe)          # {<tensor name>: (B, ...), ..., 'captions', 'keys', 'urls', 'json', 'epoch'}

    with ShardWriter("cache/", prefix="cache", shard_size=1000) as w:   # writing such shards
        w.add(key, {TENSORS_EXT: encode_tensors({"x": t}), "txt": caption.encode()})
"""
from .buckets import BucketTable, bucket_size, ratio_list, resize_shorter_side, resized_hw
from .captions import CaptionGetter, make_caption_getter
from .config import DataConfig
from .errors import DataError, ShardMissing
from .filters import FilterRule, parse_filter, parse_filters, parse_lambda
from .pipeline import DataPipeline, build_pipeline
from .sources import expand_named_sources, expand_sources
from .tarwrite import ShardWriter, write_tar
from .tensors import TENSORS_EXT, decode_tensors, encode_tensors

__all__ = [
    "BucketTable", "CaptionGetter", "DataConfig", "DataError", "DataPipeline", "FilterRule",
    "ShardMissing", "ShardWriter", "TENSORS_EXT", "bucket_size", "build_pipeline", "decode_tensors",
    "encode_tensors", "expand_named_sources", "expand_sources", "make_caption_getter", "parse_filter", "parse_filters",
    "parse_lambda", "ratio_list", "resize_shorter_side", "resized_hw", "write_tar",
]
