"""Data pipeline throughput: decode + filter + bucket + batch, with 0, 1 and 2 workers.

    python3 bench/data_throughput.py [--images 96] [--image-size 768] [--out result.json]

Writes (once, then reuses) a shard set of 1024 px JPEGs cut from scikit-image's photographs in a
temp folder, runs one epoch per worker count with the official 12 aspect ratios and an
aesthetic-score filter, and prints one summary line (images/s after the first batch, so worker
start-up is not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.data import DataConfig, build_pipeline  # noqa: E402
from tools.photo_shards import write_photo_shards  # noqa: E402

RATIOS = ["1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16"]
SIZES = [(1024, 1024), (768, 1024), (1024, 768), (576, 1024), (1024, 683), (1024, 512)]


def dataset(folder: str, n: int, shard_size: int) -> str:
    """Create the 1024 px shard set unless the same one is already there."""
    marker = os.path.join(folder, "bench.json")
    want = {"n": n, "shard_size": shard_size, "sizes": SIZES, "version": 1}
    try:
        with open(marker) as f:
            if json.load(f) == want:
                return folder
    except (OSError, ValueError):
        pass
    os.makedirs(folder, exist_ok=True)
    for fn in os.listdir(folder):
        if fn.endswith(".tar"):
            os.remove(os.path.join(folder, fn))
    write_photo_shards(folder, n, shard_size, sizes=SIZES, prefix="bench", quality=90)
    with open(marker, "w") as f:
        json.dump(want, f)
    return folder


def measure(folder: str, workers: int, image_size: int, batch: int) -> dict:
    cfg = DataConfig(webdataset_path=folder, image_size=image_size, multi_aspect_ratio=RATIOS,
                     dataset_filters=[["aesthetic_score", ">", 3.2]], num_workers=workers,
                     shuffle_buffer=64)
    pipe = build_pipeline(cfg, batch_size=batch, num_workers=workers)
    t_start = time.perf_counter()
    first = next(pipe)
    t0 = time.perf_counter()
    n = 0
    while True:
        b = next(pipe)
        if b["epoch"] > 0:
            break
        n += len(b["keys"])
    dt = time.perf_counter() - t0
    st = pipe.stats()
    pipe.close()
    return {"workers": workers, "images": n, "seconds": round(dt, 3),
            "images_per_s": round(n / dt, 2) if dt > 0 else None,
            "first_batch_s": round(t0 - t_start, 3), "first_batch_shape": list(first["images"].shape),
            "filtered": sum(st["filtered"].values()), "buckets_used": len(st["buckets"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=96, help="samples in the shard set")
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=768, help="bucket area image_size^2")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "cascade_bench_1024px"))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    folder = dataset(a.data, a.images, a.shard_size)
    prep = time.perf_counter() - t
    runs = [measure(folder, w, a.image_size, a.batch_size) for w in a.workers]
    result = {"bench": "data_throughput", "source": "1024px JPEG shards", "image_size": a.image_size,
              "batch_size": a.batch_size, "dataset_images": a.images, "dataset_prep_s": round(prep, 2),
              "cpus": os.cpu_count(), "python": platform.python_version(), "runs": runs}
    print(f"data_throughput: 1024px JPEG -> {a.image_size}^2 buckets, batch {a.batch_size}: "
          + " | ".join(f"{r['workers']} workers {r['images_per_s']} img/s" for r in runs))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
