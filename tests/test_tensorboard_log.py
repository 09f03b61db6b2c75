"""The TensorBoard logger, read back with the tensorboard package's own event reader."""
import logging
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from core.logging import RunLogger  # noqa: E402


def read(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def cfg(**kw):
    return SimpleNamespace(tensorboard=True, tensorboard_dir=None, experiment_id="tb", **kw)


def test_scalars_previews_and_figures_read_back(tmp_path):
    logger = RunLogger(str(tmp_path), cfg(), is_main=True, total_steps=3)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.1, "note": "text is skipped", "val_loss": float("nan")})
    logger.log_previews(2, {"generator": torch.rand(2, 3, 16, 16)}, nrow=2)
    logger.log(3, {"val_loss": 0.5, "val_mse_t0.5": 0.25})
    logger.plot_loss()  # writes val_timesteps.png, which goes to TensorBoard too
    logger.close()
    acc = read(tmp_path / "tensorboard")
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert [e.step for e in acc.Scalars("val_loss")] == [3]  # the NaN was not written
    image = acc.Images("previews/generator")[0]
    assert image.step == 2 and image.width >= 128  # enlarged like the PNG grid
    assert acc.Images("validation/mse_over_t")[0].step == 3


def test_resume_purges_the_thrown_away_updates(tmp_path):
    logger = RunLogger(str(tmp_path), cfg(), is_main=True, total_steps=4)
    for step in (1, 2, 3, 4):
        logger.log(step, {"loss": float(step)})
    logger.close()
    resumed = RunLogger(str(tmp_path), cfg(), is_main=True, total_steps=4, start_step=2, resume_step=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    values = {e.step: e.value for e in read(tmp_path / "tensorboard").Scalars("loss")}
    assert values == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}


def test_a_failing_writer_is_one_warning_and_the_run_goes_on(tmp_path, caplog):
    logger = RunLogger(str(tmp_path), cfg(), is_main=True, total_steps=3)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    logger.tensorboard.writer.add_scalar = broken
    with caplog.at_level(logging.WARNING):
        for step in (1, 2, 3):
            logger.log(step, {"loss": 1.0})
    logger.close()
    warnings = [r for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # the local log is complete


def test_missing_package_is_one_warning(tmp_path, caplog, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(str(tmp_path), cfg(), is_main=True, total_steps=1)
        logger.log(1, {"loss": 1.0})
        logger.close()
    assert sum("tensorboard: cannot start" in r.getMessage() for r in caplog.records) == 1
