"""``gradient_checkpointing: true | N``: every N-th U-Net block is recomputed, gradients unchanged."""
from __future__ import annotations

import pytest
import torch

from tests.test_modules_stage_bc import _c_inputs, _randomise


def test_every_nth_block_is_recomputed_with_equal_gradients(monkeypatch):
    import modules.common as common
    from modules.common import BLOCK_TYPES, checkpoint_every, checkpointed_blocks
    from modules.registry import build_model

    assert checkpointed_blocks(5, 2) == [True, False, True, False, True]
    assert checkpointed_blocks(3, 0) == [False] * 3 and checkpoint_every(True) == 1 and checkpoint_every(3) == 3
    calls = []
    real = common.checkpoint
    monkeypatch.setattr(common, "checkpoint", lambda block, *a, **k: (calls.append(block), real(block, *a, **k))[1])
    inputs = _c_inputs()
    grads, counts = [], []
    for setting in (False, True, 2):
        model = _randomise(build_model("stage_c", "tiny")).train()
        model.set_gradient_checkpointing(setting)
        calls.clear()
        torch.manual_seed(123)  # dropout masks replay identically
        model(**inputs).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        counts.append(len(calls))
    blocks = [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
    assert counts[0] == 0 and counts[1] > counts[2] > 0
    assert counts[2] == sum(checkpointed_blocks(len(blocks), 2)) * counts[1] // len(blocks)
    for a, b, c in zip(*grads):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("value, ok", [("true", True), ("2", True), ("false", True), ("0", False), ("-3", False)])
def test_config_accepts_true_or_a_period(value, ok, tmp_path):
    from core.config import load_config, save_config
    from core.errors import UserError
    from train.train_c import StageCConfig

    sets = [f"gradient_checkpointing={value}", "checkpoint_path=/tmp/x", "output_path=/tmp/x"]
    if not ok:
        with pytest.raises(UserError, match="gradient_checkpointing"):
            load_config(StageCConfig, "configs/training/tiny_c.yaml", sets, validate_only=True)
        return
    cfg = load_config(StageCConfig, "configs/training/tiny_c.yaml", sets, validate_only=True)
    save_config(cfg, str(tmp_path / "c.yaml"))  # the run's saved config reads back the same value and type
    again = load_config(StageCConfig, str(tmp_path / "c.yaml"), validate_only=True)
    assert again.gradient_checkpointing == cfg.gradient_checkpointing
    assert type(again.gradient_checkpointing) is type(cfg.gradient_checkpointing)
