"""Inspect a dataset: samples, bucket histogram, filter pass rate, bad samples.

    python3 -m core.data.inspect CONFIG.yaml            # a training config (its data keys)
    python3 -m core.data.inspect shards/ s3://b/p/ x.tar [--image-size 768] [--ratios 1/1 9/16 ...]

Reads every shard once, in order, with the same filter / caption / bucket rules as training
(bucket = the closest ratio, without the random 5 %). ``--decode`` also decodes every image to
find corrupt JPEG bodies (slower). ``--json FILE`` writes the report as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np

from .buckets import BucketTable
from .captions import make_caption_getter
from .config import DataConfig
from .errors import DataError
from .filters import parse_filters
from .images import BadImage, ImageTooLarge, load_to_bucket
from .plan import ShardPlan
from .sources import expand_sources
from .worker import StreamSpec, WorkerStream


class _InOrder(ShardPlan):
    """One reader, shards in the configured order (the shuffle is for training only)."""

    def shards(self, epoch: int, worker: int) -> list[str]:
        return list(self.urls)


def load_config(args: list[str], image_size: int | None, ratios: list[str] | None) -> DataConfig:
    """A training YAML (a mapping with webdataset_path) or a list of shard paths/URLs."""
    if len(args) == 1 and args[0].lower().endswith((".yaml", ".yml")):
        import yaml
        try:
            with open(args[0], encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except OSError as e:
            raise DataError(f"inspect: cannot read {args[0]}: {e.strerror}") from None
        if isinstance(doc, dict):
            cfg = DataConfig.from_dict(doc)
            if image_size:
                cfg.image_size = image_size
            if ratios:
                cfg.multi_aspect_ratio = ratios
            return cfg.validate()
    return DataConfig(webdataset_path=list(args), image_size=image_size or 768,
                      multi_aspect_ratio=ratios or None, num_workers=0).validate()


def inspect(cfg: DataConfig, decode: bool = False, limit: int | None = None) -> dict:
    """Read the dataset once and return the report dict."""
    urls = expand_sources(cfg.webdataset_path)
    table = BucketTable(cfg.image_size, cfg.multi_aspect_ratio, 0.0)  # deterministic buckets
    spec = StreamSpec(plan=_InOrder(urls, 0, 0, 1, 1, False), batch_size=1 << 30, table=table,
                      crop="center", filters=parse_filters(cfg.dataset_filters),
                      captions=make_caption_getter(cfg.captions_getter, cfg.caption_key, cfg.tag_options()),
                      shuffle_buffer=1, strict=False, max_pixels=cfg.max_image_pixels)
    ws = WorkerStream(spec, 0)
    hist: Counter[str] = Counter()
    seen = kept = 0
    for url, s, bucket, entry in ws.scan():
        seen += 1
        if bucket is not None:
            if decode:
                try:
                    load_to_bucket(entry.data, bucket, "center", np.random.default_rng(0),
                                   cfg.max_image_pixels)
                except BadImage as e:
                    ws.stats.bad_sample("oversized_image" if isinstance(e, ImageTooLarge)
                                        else "undecodable_image", url, s.key, str(e))
                    continue
            kept += 1
            hist[f"{bucket[0]}x{bucket[1]}"] += 1
        if limit and seen >= limit:
            break
    st = ws.stats
    passed_filters = seen - sum(st.filtered.values()) - sum(st.missing_key.values())
    return {
        "shards": len(urls), "samples": seen, "usable": kept,
        "filter_pass_rate": (passed_filters / seen) if seen else 0.0,
        "filtered": dict(st.filtered), "missing_filter_key": dict(st.missing_key),
        "bad": dict(st.bad), "bad_samples": st.records + st.shard_faults,
        "buckets": {f"{h}x{w}": hist.get(f"{h}x{w}", 0) for h, w in table.buckets},
    }


def render(r: dict) -> str:
    lines = [f"shards: {r['shards']}  samples: {r['samples']}  usable: {r['usable']}  "
             f"filter pass rate: {100 * r['filter_pass_rate']:.1f}%"]
    if r["filtered"] or r["missing_filter_key"]:
        lines.append(f"filtered out by key: {r['filtered']}  lacking the key: {r['missing_filter_key']}")
    lines.append("buckets (h x w: samples):")
    total = max(1, r["usable"])
    for b, n in r["buckets"].items():
        lines.append(f"  {b:>10}: {n:6d} {'#' * round(40 * n / total)}")
    lines.append(f"bad samples: {sum(r['bad'].values())} {r['bad'] or ''}")
    for rec in r["bad_samples"][:50]:
        lines.append(f"  {rec['reason']}: {rec['url']} key={rec['key']} {rec['detail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m core.data.inspect", description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", help="a training config .yaml, or shard paths/dirs/URLs")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--ratios", nargs="+", default=None, help="multi_aspect_ratio, e.g. 1/1 9/16")
    ap.add_argument("--decode", action="store_true", help="decode every image (finds corrupt bodies)")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    ap.add_argument("--json", default=None, help="also write the report to this JSON file")
    a = ap.parse_args(argv)
    try:
        report = inspect(load_config(a.inputs, a.image_size, a.ratios), a.decode, a.limit)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(report))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
