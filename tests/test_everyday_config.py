"""Issue 26 point 8: every config error in one report, ``--set`` errors name the flag, and the
names other trainers use get a 'did you mean'."""
from __future__ import annotations

import pytest

from core.config import load_config
from core.errors import UserError
from train.train_c import StageCTrainer
from train.train_c_lora import StageCLoraTrainer

TINY_C = "configs/training/tiny_c.yaml"


def _error(cls, path, overrides, tmp_path=None) -> str:
    with pytest.raises(UserError) as info:
        load_config(cls.Config, path, overrides, validate_only=True)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_every_unknown_key_is_reported_at_once_with_the_flag_that_set_it():
    text = _error(StageCTrainer, TINY_C, ["learning_rate=1e-4", "max_train_steps=10", "train_batch_size=2",
                                           "resolution=256", "rank=4"])
    assert text.startswith("5 config errors")
    assert "--set learning_rate=1e-4: unknown config key 'learning_rate'; did you mean 'lr'?" in text
    assert "--set max_train_steps=10" in text and "did you mean 'updates'?" in text
    assert "did you mean 'batch_size'?" in text and "did you mean 'image_size'?" in text
    assert "'rank'; it is a key of the LoRA job" in text


def test_the_lora_job_suggests_its_own_names(tmp_path):
    text = _error(StageCLoraTrainer, "configs/training/tiny_c_lora.yaml", ["network_dim=8", "lora_alpha=2"])
    assert "did you mean 'rank'?" in text and "did you mean 'alpha'?" in text


def test_file_errors_name_the_file_and_several_validators_report_together(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(open(TINY_C).read() + "learnin_rate: 1.0\nbatch_siz: 3\n")
    text = _error(StageCTrainer, str(cfg), [])
    assert f"{cfg}: unknown config key 'learnin_rate'" in text and "'batch_siz'; did you mean 'batch_size'?" in text
    # two components' checks fail: both are reported
    text = _error(StageCTrainer, TINY_C, ["lr=-1", "text_dropout=2"])
    assert "'lr' must be a finite number > 0" in text and "'text_dropout' must be in [0, 1]" in text
    # a type error from --set names the flag
    assert _error(StageCTrainer, TINY_C, ["updates=many"]).startswith("--set updates=many: config key 'updates'")
