"""Every shipped LoRA / ControlNet training config validates (placeholder paths allowed), and the
LoRA-specific keys reject bad values with one clear line."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LORA_CONFIGS = ["finetune_c_3b_lora.yaml", "finetune_c_1b_lora.yaml", "tiny_c_lora.yaml"]
CNET_CONFIGS = ["controlnet_c_3b_canny.yaml", "controlnet_c_3b_inpainting.yaml", "controlnet_c_3b_identity.yaml",
                "controlnet_c_3b_sr.yaml", "tiny_c_controlnet_canny.yaml", "tiny_c_controlnet_inpainting.yaml",
                "tiny_c_controlnet_sr.yaml"]


@pytest.mark.parametrize("name", LORA_CONFIGS + CNET_CONFIGS)
def test_shipped_config_validates(name, capsys, tmp_path, monkeypatch):
    """Official configs: OK, their placeholders and official files listed. Tiny configs name files
    under runs/ (relative to the working directory): where those do not exist, --validate-only
    says which one (issue 26.7) instead of "config OK"."""
    from core.errors import UserError
    from train.train_c_controlnet import StageCControlNetTrainer
    from train.train_c_lora import StageCLoraTrainer

    trainer = StageCLoraTrainer if name in LORA_CONFIGS else StageCControlNetTrainer
    monkeypatch.chdir(tmp_path)  # nothing of runs/ here
    argv = [str(ROOT / "configs" / "training" / name), "--validate-only"]
    if name.startswith("tiny"):
        with pytest.raises(UserError, match=r"config key '\w+': (file|folder) not found: runs/"):
            trainer.main(argv)
        return
    assert trainer.main(argv) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "not checked" in out and "models/effnet_encoder.safetensors" in out


def test_seed_lora_config_keeps_the_official_values():
    from core.config import load_config
    from train.train_c_lora import LoraConfig

    cfg = load_config(LoraConfig, str(ROOT / "configs/training/finetune_c_3b_lora.yaml"), validate_only=True)
    assert cfg.module_filters == [".attn"] and cfg.rank == 4 and cfg.alpha == 1.0
    assert cfg.train_tokens == [["[fernando]", "^dog</w>"]] and cfg.batch_size == 32 and cfg.grad_accum_steps == 4


@pytest.mark.parametrize("override, needle", [
    ("rank=0", "'rank' must be >= 1"),
    ("alpha=-1", "'alpha' must be > 0"),
    ("module_filters=[]", "module_filters"),
    ("train_tokens=[['[x]']]", "train_tokens"),
    ("ema_start_iters=10", "EMA is not supported"),
])
def test_bad_lora_keys_are_one_line_errors(override, needle, capsys):
    from core.errors import run_cli
    from train.train_c_lora import StageCLoraTrainer

    with pytest.raises(SystemExit) as exc:
        run_cli(StageCLoraTrainer.main, [str(ROOT / "configs/training/tiny_c_lora.yaml"), "--validate-only",
                                         "--set", override, "--set", "ema_iters=1", "--set", "ema_beta=0.5"]
                if "ema" in override else
                [str(ROOT / "configs/training/tiny_c_lora.yaml"), "--validate-only", "--set", override])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and needle in err and "Traceback" not in err, err


def test_dry_runs_report_the_official_adapter_sizes(capsys):
    """Meta-device sizes equal the manifests: LoRA 3,147,008 - 1,280 token params; canny 54,255,776."""
    from train.train_c_controlnet import StageCControlNetTrainer
    from train.train_c_lora import StageCLoraTrainer

    assert StageCLoraTrainer.main([str(ROOT / "configs/training/finetune_c_3b_lora.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "128 adapted weights, rank 4, 3,145,728 LoRA parameters" in out
    # the memory estimate of the configured run (fake tensors: no weights needed)
    assert "# memory estimate per rank: stage_c 3.6B lora, per-rank micro-batch 8, 768x768" in out
    for line in ("weights (trained)", "gradients", "optimizer states (adamw)", "activations, no checkpointing",
                 "activations, gradient checkpointing", "peak, no checkpointing", "peak, checkpointing"):
        assert f"\n{line}" in out and " GiB" in out.split(f"\n{line}", 1)[1].split("\n", 1)[0], line
    assert StageCControlNetTrainer.main([str(ROOT / "configs/training/controlnet_c_3b_canny.yaml"), "--dry-run"]) == 0
    assert "c_proj 2048, blocks [0, 4, 8, 12, 51, 55, 59, 63]: 54,255,776 parameters" in capsys.readouterr().out
