"""The benches run at tiny settings and print one summary line + write their JSON (no timings are
asserted: the machine running the tests says nothing about performance)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(train_assets):
    """This module's name for the shared training assets (tests/conftest.py)."""
    return train_assets


def tiny_sets(assets: Path) -> list[str]:
    values = {"webdataset_path": assets / "shards", "effnet_checkpoint_path": assets / "effnet_encoder.safetensors",
              "previewer_checkpoint_path": assets / "previewer.safetensors",
              "clip_text_model_name": assets / "clip/text", "clip_image_model_name": assets / "clip/vision",
              "image_size": 64, "batch_size": 2, "num_workers": 0}
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return out


def _one_line(capsys, prefix: str) -> str:
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    return lines[0]


def test_train_step_bench(assets, tmp_path, capsys):
    from bench.train_step import main

    out = tmp_path / "r.json"
    assert main(["--config", str(ROOT / "configs/training/tiny_c.yaml"), "--steps", "1", "--warmup", "0",
                 *tiny_sets(assets), "--set", "gradient_checkpointing=true", "--out", str(out)]) == 0
    _one_line(capsys, "train_step StageCTrainer tiny")
    r = json.loads(out.read_text())
    assert r["steps"] == 1 and r["median_step_s"] > 0 and r["images_per_s"] > 0 and r["peak_memory_bytes"] > 0


def test_sampling_bench(tmp_path, capsys):
    from bench.sampling import main

    out = tmp_path / "s.json"
    assert main(["--size", "64", "--images", "1", "--steps-c", "1", "--steps-b", "1", "--out", str(out)]) == 0
    _one_line(capsys, "sampling C tiny / B tiny 64px")
    r = json.loads(out.read_text())
    assert r["output_shape"] == [1, 3, 64, 64] and r["total_s_per_image"] > 0


def test_cache_speedup_bench(assets, tmp_path, capsys):
    from bench.cache_speedup import main

    out = tmp_path / "c.json"
    assert main(["--config", str(ROOT / "configs/training/tiny_c.yaml"), "--steps", "1", *tiny_sets(assets),
                 "--out", str(out)]) == 0
    _one_line(capsys, "cache_speedup tiny batch 2 64px")
    r = json.loads(out.read_text())
    assert r["steps_per_s_images"] > 0 and r["steps_per_s_cache"] > 0


def test_memory_estimate_cli(capsys):
    from bench.memory_estimate import main

    assert main(["--version", "tiny", "--batch-size", "1", "--image-size", "64", "--json"]) == 0
    out = capsys.readouterr().out
    assert "activations, gradient checkpointing" in out and '"total_checkpointed"' in out
