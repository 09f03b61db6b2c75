"""Shared helpers of the encoder-cache tests: a tiny Stage C config over the ``train_assets``
fixture's models and photo shards, and caches written by the real tools/cache_dataset.py."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(assets: Path, tmp: Path, config_cls=None, yaml_file: str = "tiny_c.yaml", **extra):
    """The tiny Stage C job over ``assets`` (high dropout probabilities so both branches occur in a
    4-sample batch)."""
    from core.config import load_config
    from train.train_c import StageCConfig

    values = {"webdataset_path": str(assets / "shards"),
              "effnet_checkpoint_path": str(assets / "effnet_encoder.safetensors"),
              "previewer_checkpoint_path": str(assets / "previewer.safetensors"),
              "clip_text_model_name": str(assets / "clip/text"),
              "clip_image_model_name": str(assets / "clip/vision"),
              "checkpoint_path": str(tmp / "ck"), "output_path": str(tmp / "out"),
              "image_size": 64, "batch_size": 4, "num_workers": 0,
              "text_dropout": 0.5, "image_embed_prob": 0.5, **extra}
    sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
    return load_config(config_cls or StageCConfig, str(ROOT / "configs/training" / yaml_file), sets)


def tool_cache(assets: Path, base: Path, name: str = "cache_out", **data_keys) -> tuple[Path, dict]:
    """A cache of the 16 photo samples of ``assets`` (the ``train_assets`` fixture; 4 shards of <= 5)
    written by tools/cache_dataset.py under ``base``, once per session per ``name``; ``data_keys``
    (e.g. multi_aspect_ratio) go into the data config."""
    from tools.cache_dataset import cache_dataset

    out = base / name
    if not (out / "cache" / "cache.json").is_file():
        cfg = tiny_config(assets, out, **data_keys)
        cache_dataset(cfg, str(out / "cache"), batch_size=4, shard_size=5, progress=False)
    return out / "cache", json.loads((out / "cache" / "cache.json").read_text())
