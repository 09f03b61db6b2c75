"""core.logging: metrics.jsonl, preview grids, loss curve, resume truncation, wandb absent."""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from core.logging import RunLogger, image_grid, read_metrics


@dataclass
class Cfg:
    experiment_id: str = "exp"


def test_metrics_previews_and_plot(tmp_path):
    logger = RunLogger(str(tmp_path), Cfg(), is_main=True, total_steps=10)
    for step in range(1, 6):
        logger.progress(step, loss=1.0 / step, images=8)
        logger.log(step, {"loss": torch.tensor(1.0 / step), "lr": 1e-4, "bad": float("nan")})
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert math.isclose(records[1]["loss"], 0.5) and records[0]["bad"] is None  # valid JSON, no NaN
    path = logger.log_images(5, "sample", torch.rand(5, 3, 8, 6), nrow=3)
    assert path == str(tmp_path / "previews" / "sample_00000005.png")
    with Image.open(path) as image:
        assert image.size == (3 * 8 + 2, 2 * 10 + 2)  # 3 columns x 2 rows, 2px padding
    assert (tmp_path / "previews" / "latest_sample.png").read_bytes() == open(path, "rb").read()
    assert logger.plot_loss() == str(tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as image:
        assert image.format == "PNG"
    logger.close()


def test_resume_truncates_redone_steps_and_torn_lines(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "lo')  # torn by a crash
    logger = RunLogger(str(tmp_path), Cfg(), is_main=True, total_steps=10, start_step=4, resume_step=4)
    logger.log(5, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4, 5]


def test_non_main_rank_is_silent(tmp_path):
    logger = RunLogger(str(tmp_path / "run"), Cfg(), is_main=False, total_steps=3)
    logger.progress(1, 0.1, 2)
    logger.log(1, {"loss": 1.0})
    assert logger.log_images(1, "x", torch.rand(1, 3, 4, 4)) is None and logger.plot_loss() is None
    logger.close()
    assert not (tmp_path / "run").exists()


def test_wandb_missing_warns_once_without_crash(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, even if installed
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(str(tmp_path), Cfg(), is_main=True, total_steps=2, wandb_project="StableCascade")
        logger.log(1, {"loss": 1.0})
        logger.log_images(1, "x", torch.rand(1, 3, 4, 4))
        logger.close()
    warnings = [r for r in caplog.records if "wandb is not installed" in r.getMessage()]
    assert len(warnings) == 1 and logger.wandb is None
    assert read_metrics(str(tmp_path / "metrics.jsonl"))[0]["loss"] == 1.0


def test_image_grid_checks_shape():
    assert image_grid(torch.rand(2, 1, 4, 4), nrow=4).shape == (3, 8, 14)
    with pytest.raises(ValueError, match="expects"):
        image_grid(torch.rand(3, 4, 4))


def test_log_advances_progress_bar(tmp_path):
    logger = RunLogger(str(tmp_path), Cfg(), is_main=True, total_steps=10, start_step=2, interactive=True)
    logger.log(3, {"loss": 0.25, "images_per_s": 12.0})
    assert logger._bar.n == 3 and "0.2500" in str(logger._bar.postfix) and "12.0" in str(logger._bar.postfix)
    logger.close()


def test_a_log_file_gets_progress_lines_not_carriage_returns(tmp_path, caplog):
    """Issue 26 point 11: stderr that is not a terminal gets a plain progress line every log_every
    updates (with the epoch and an ETA), never tqdm's carriage-return bar."""
    import logging

    class Every2(Cfg):
        log_every = 2

    logger = RunLogger(str(tmp_path), Every2(), is_main=True, total_steps=5, interactive=False)
    assert logger._bar is None
    logger.epoch = 3
    with caplog.at_level(logging.INFO, logger="core"):
        for step in range(1, 6):
            logger.progress(step, loss=0.5, images_per_s=4.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert [line.split(",")[0] for line in lines] == ["progress: update 2/5 (40%)", "progress: update 4/5 (80%)",
                                                     "progress: update 5/5 (100%)"]
    assert "epoch 3" in lines[0] and "ETA" in lines[0] and not any("\r" in line for line in lines)
    logger.close()
