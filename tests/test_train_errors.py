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
    from fileio.state_dicts import save_safetensors
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


def test_dry_run_of_an_official_config_per_rank_under_fsdp():
    """``WORLD_SIZE=8 train_c.py finetune_c_3b.yaml --set use_fsdp=true --dry-run`` (a real process,
    no weights downloaded): the estimate is one rank's: micro-batch 512 / 8 / grad_accum_steps, the
    generator's float32 weights and gradients and its two AdamW states are the FSDP2 shards
    (ceil(dim0 / 8) rows of each tensor: full / 8 within the printed 0.01 GiB), the bf16 encoders
    stay whole."""
    import re

    import yaml

    from core.memory import GIB
    from modules.registry import build_model
    from train.memory_specs import clip_text_params, clip_vision_params

    config = ROOT / "configs/training/finetune_c_3b.yaml"
    proc = subprocess.run([sys.executable, "train/train_c.py", str(config), "--set", "use_fsdp=true", "--dry-run"],
                          cwd=ROOT, env=subprocess_env(WORLD_SIZE="8"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "generator: stage_c 3.6B: 3,589,103,632 parameters" in out
    assert "missing files" in out and "global 512" in out
    rows = dict(re.findall(r"^(\S.*?)\s+(\d+\.\d\d) GiB$", out, flags=re.M))
    official = yaml.safe_load(config.read_text())
    per_rank = official["batch_size"] // 8 // official.get("grad_accum_steps", 1)
    assert per_rank == 64
    assert f"x per-rank {per_rank}" in out and f"per-rank micro-batch {per_rank}, 768x768" in out
    assert "# world size 8, FSDP:" in out and "sharded 8 ways" in out
    assert "# target device: CUDA GPU with bf16 (precision auto: bf16 autocast; frozen_dtype unset: bfloat16)" in out

    generator = build_model("stage_c", "3.6B", device="meta")
    full = sum(p.numel() for p in generator.parameters()) * 4
    shard = sum(-(-p.shape[0] // 8) * (p.numel() // p.shape[0]) * 4 for p in generator.parameters())
    assert rows["weights (trained)"] == rows["gradients"] == f"{shard / GIB:.2f}"
    assert rows["optimizer states (adamw)"] == f"{2 * shard / GIB:.2f}"
    for row, states in (("weights (trained)", 1), ("optimizer states (adamw)", 2)):
        assert abs(float(rows[row]) - states * full / 8 / GIB) <= 0.01, row
    encoders = (clip_text_params() + clip_vision_params()
                + sum(p.numel() for kind in ("effnet", "previewer")
                      for p in build_model(kind, "default", device="meta").parameters())) * 2
    assert rows["frozen encoders"] == f"{encoders / GIB:.2f}"             # replicated, bf16 on the GPU
    assert float(rows["FSDP all-gathered units"]) > 0


@pytest.mark.parametrize("flag", ["--validate-only", "--dry-run"])
def test_validate_only_and_dry_run_check_the_launchers_world_size(flag, capsys, monkeypatch):
    """Both run the run's own validation: batch_size 512 does not split over 3 ranks, nor over 8
    ranks x 3 accumulation steps; a launcher variable that is not a number is named."""
    config = str(ROOT / "configs/training/finetune_c_3b.yaml")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = run_in_process([config, flag], capsys)
    assert_one_clear_line(code, err, "batch_size", "world_size (3)", "divisible")
    monkeypatch.setenv("WORLD_SIZE", "8")
    code, err = run_in_process([config, flag, "--set", "grad_accum_steps=3"], capsys)
    assert_one_clear_line(code, err, "batch_size", "world_size (8) x grad_accum_steps (3)")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "many")
    code, err = run_in_process([config, flag], capsys)
    assert_one_clear_line(code, err, "SLURM_NTASKS")


def test_validate_only_accepts_what_the_run_accepts(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SystemExit) as exit_info:
        from core.errors import run_cli
        from train.train_c import StageCTrainer

        run_cli(StageCTrainer.main, [str(ROOT / "configs/training/finetune_c_3b.yaml"), "--validate-only"])
    assert exit_info.value.code == 0
    assert "world size 8: per-rank micro-batch 64" in capsys.readouterr().out
