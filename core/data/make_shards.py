"""Turn a folder of ``name.jpg`` + ``name.txt`` (+ ``name.json``) into webdataset shards.

    python3 -m core.data.make_shards SRC_DIR OUT_DIR --shard-size 1000 [--prefix shard]

Files are grouped by name (sorted); a name with an image becomes one sample. Names holding dots
get them replaced by ``_`` (webdataset cuts the key at the first dot). Images without a caption
are still written but counted in the summary, since the training pipeline will skip them.
"""
from __future__ import annotations

import argparse
import os
import sys

from .images import IMAGE_EXTS
from .tarwrite import write_tar

_EXTS = set(IMAGE_EXTS) | {"txt", "json"}


def collect(src: str) -> dict[str, dict[str, str]]:
    """name -> {ext: path} for the files of ``src`` (recursively) with a known extension.
    Hidden files and folders (leading ``.``, e.g. macOS ``._x.jpg`` resource forks) are skipped,
    as by the image-folder source (``imagefolder.py``)."""
    groups: dict[str, dict[str, str]] = {}
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for fn in files:
            stem, dot, ext = fn.rpartition(".")
            if not dot or not stem or fn.startswith(".") or ext.lower() not in _EXTS:
                continue
            rel = os.path.relpath(os.path.join(root, stem), src)
            key = rel.replace(os.sep, "/").replace(".", "_")
            groups.setdefault(key, {})[ext.lower()] = os.path.join(root, fn)
    return groups


def make_shards(src: str, out: str, shard_size: int, prefix: str = "shard") -> tuple[list[str], dict]:
    """Write the shards; returns (paths, counts)."""
    if not os.path.isdir(src):
        raise SystemExit(f"make_shards: {src} is not a directory")
    if shard_size < 1:
        raise SystemExit("make_shards: --shard-size must be >= 1")
    groups = collect(src)
    keys = sorted(k for k, g in groups.items() if any(e in g for e in IMAGE_EXTS))
    counts = {"samples": len(keys), "without_caption": sum("txt" not in groups[k] for k in keys),
              "without_image": len(groups) - len(keys)}
    width = max(4, len(str(max(0, (len(keys) - 1) // shard_size))))
    paths = []
    for n, start in enumerate(range(0, len(keys), shard_size)):
        samples = []
        for k in keys[start:start + shard_size]:
            files = {}
            for ext, path in groups[k].items():
                with open(path, "rb") as f:
                    files["jpg" if ext == "jpeg" else ext] = f.read()
            samples.append((k, files))
        paths.append(write_tar(os.path.join(out, f"{prefix}-{n:0{width}d}.tar"), samples))
    return paths, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m core.data.make_shards", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="folder of name.jpg + name.txt (+ name.json)")
    ap.add_argument("out", help="output folder for the .tar shards")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    ap.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    a = ap.parse_args(argv)
    try:
        paths, counts = make_shards(a.src, a.out, a.shard_size, a.prefix)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    print(f"wrote {counts['samples']} samples into {len(paths)} shard(s) in {a.out} "
          f"({counts['without_caption']} without caption, {counts['without_image']} names without image skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
