"""Issue 26 points 9-11 on a real tiny run: nothing is created before the data is found; a
resumed run says so once and never 'FROM SCRATCH'; images and epochs are logged."""
from __future__ import annotations

import logging

import pytest

from core.errors import UserError
from tests.test_train_e2e import C_CONFIG, config_args, train_c

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_missing_dataset_creates_no_folder(train_assets, tmp_path):
    args = config_args(C_CONFIG, train_assets, tmp_path, experiment_id="nodata",
                       webdataset_path=str(tmp_path / "no_such_shards"), updates=1, save_every=1)
    with pytest.raises(Exception) as info:
        train_c(args)
    assert "webdataset_path" in str(info.value) and (isinstance(info.value, UserError)
                                                     or type(info.value).__name__ == "DataError")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists()


def test_resume_is_announced_once_and_images_and_epochs_are_logged(train_assets, tmp_path, capsys, caplog):
    common = dict(experiment_id="r", save_every=1, preview_every=0)
    with caplog.at_level(logging.INFO):
        assert train_c(config_args(C_CONFIG, train_assets, tmp_path, updates=1, **common)) == 0
    text = caplog.text
    assert "data: 16 image(s) in 2 shard(s)" in text and "data: epoch 0 begins at update 1" in text
    assert "FROM SCRATCH" in text
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        assert train_c(config_args(C_CONFIG, train_assets, tmp_path, updates=2, **common)) == 0
    out = capsys.readouterr().out + caplog.text
    assert out.count("resuming from") == 1, out
    assert "FROM SCRATCH" not in out and "weights come from the checkpoint being resumed" in out
