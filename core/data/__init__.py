"""Data layer: webdataset shards (local / S3) -> filtered, captioned, bucketed batches.

Usable alone (imports nothing else from ``core``). Public API::

    from core.data import DataConfig, DataError, build_pipeline
    pipe = build_pipeline(DataConfig(webdataset_path="shards/", image_size=768), batch_size=8)
    batch = next(pipe)          # {'images', 'captions', 'caption_dropped', 'keys', 'urls', 'json', 'epoch'}
    state = pipe.state_dict()   # JSON-able; build_pipeline(..., state=state) continues exactly
"""
from .buckets import BucketTable, bucket_size, ratio_list, resize_shorter_side, resized_hw
from .captions import CaptionGetter, make_caption_getter
from .config import DataConfig
from .errors import DataError, ShardMissing
from .filters import FilterRule, parse_filter, parse_filters, parse_lambda
from .pipeline import DataPipeline, build_pipeline
from .sources import expand_sources

__all__ = [
    "BucketTable", "CaptionGetter", "DataConfig", "DataError", "DataPipeline", "FilterRule",
    "ShardMissing", "bucket_size", "build_pipeline", "expand_sources", "make_caption_getter",
    "parse_filter", "parse_filters", "parse_lambda", "ratio_list", "resize_shorter_side",
    "resized_hw",
]
