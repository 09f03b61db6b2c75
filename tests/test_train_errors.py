"""User errors of the training scripts: one clear line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_e2e import C_CONFIG, config_args, subprocess_env

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(train_assets):
    """This module's name for the shared training assets (tests/conftest.py)."""
    return train_assets


def run_in_process(args: list[str], capsys) -> tuple[int, str]:
    """The script's real entry point (run_cli around main), in this process for speed."""
    import logging

    from core.errors import run_cli
    from train.train_c import StageCTrainer

    root = logging.getLogger()  # log handlers of earlier in-process runs hold stale captured streams
    for handler in [h for h in root.handlers if getattr(h, "_cascade", False)]:
        root.removeHandler(handler)

    with pytest.raises(SystemExit) as exit_info:
        run_cli(StageCTrainer.main, args)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_clear_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_unknown_key_suggests_the_closest(assets, tmp_path, capsys):
    code, err = run_in_process(config_args(C_CONFIG, assets, tmp_path, save_evry=3), capsys)
    assert_one_clear_line(code, err, "unknown config key 'save_evry'", "did you mean 'save_every'")


def test_wrong_type_names_key_and_type(assets, tmp_path, capsys):
    code, err = run_in_process(config_args(C_CONFIG, assets, tmp_path, batch_size="eight"), capsys)
    assert_one_clear_line(code, err, "'batch_size'", "int")


def test_missing_checkpoint_file(assets, tmp_path, capsys):
    code, err = run_in_process(config_args(C_CONFIG, assets, tmp_path,
                                           generator_checkpoint_path=str(tmp_path / "nope.safetensors")), capsys)
    assert_one_clear_line(code, err, "generator_checkpoint_path", "nope.safetensors")


def test_wrong_model_version_for_checkpoint(assets, tmp_path, capsys):
    from modules.loading import save_safetensors
    from modules.registry import build_model

    path = tmp_path / "stage_c_tiny.safetensors"
    save_safetensors(build_model("stage_c", "tiny"), path)
    code, err = run_in_process(config_args(C_CONFIG, assets, tmp_path, generator_checkpoint_path=str(path),
                                           model_version="1B"), capsys)
    assert_one_clear_line(code, err, "stage_c_tiny.safetensors")
    assert "tiny" in err.splitlines()[-1]


def test_empty_dataset(assets, tmp_path, capsys):
    from tools.photo_shards import write_tar

    empty = write_tar(str(tmp_path / "empty" / "empty-0000.tar"), [])
    code, err = run_in_process(config_args(C_CONFIG, assets, tmp_path, webdataset_path=empty), capsys)
    assert_one_clear_line(code, err)


def test_unwritable_output_folder(assets, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = run_in_process(config_args(C_CONFIG, assets, tmp_path, checkpoint_path=str(blocker / "ck")), capsys)
    assert_one_clear_line(code, err, "checkpoint_path")


def test_fp16_refused_for_stage_c(assets, tmp_path, capsys):
    code, err = run_in_process(config_args(C_CONFIG, assets, tmp_path, precision="fp16"), capsys)
    assert_one_clear_line(code, err, "fp16")


def test_batch_not_divisible_by_world_size(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = run_in_process(config_args(C_CONFIG, assets, tmp_path, batch_size=8), capsys)
    assert_one_clear_line(code, err, "batch_size", "divisible")


def test_real_process_exit_code_and_no_traceback(assets, tmp_path):
    proc = subprocess.run([sys.executable, "train/train_c.py", *config_args(C_CONFIG, assets, tmp_path, lr="fast")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_resume_with_another_architecture_is_refused(assets, tmp_path, capsys):
    args = config_args(C_CONFIG, assets, tmp_path, experiment_id="arch", updates=1, save_every=1)
    code, err = run_in_process(args, capsys)
    assert code == 0, err
    code, err = run_in_process([*args, "--set", "model_version=1B"], capsys)
    assert_one_clear_line(code, err, "model_version", "tiny", "1B")


def test_dry_run_of_an_official_config_without_weights(capsys):
    from train.train_c import StageCTrainer

    assert StageCTrainer.main([str(ROOT / "configs/training/finetune_c_3b.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "generator: stage_c 3.6B: 3,589,103,632 parameters" in out
    assert "missing files" in out and "global 512" in out
