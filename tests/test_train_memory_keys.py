"""The memory keys of a YAML really reach the trainer: frozen_dtype casts the frozen networks,
optimizer picks core.optim's optimizer, gradient_checkpointing switches the generator's blocks."""
from __future__ import annotations

import pytest
import torch

from tests.test_cache_exactness import tiny_config


@pytest.fixture(scope="module")
def assets(train_assets):
    """This module's name for the shared training assets (tests/conftest.py)."""
    return train_assets


def test_frozen_dtype_optimizer_and_checkpointing_reach_the_trainer(assets, tmp_path, monkeypatch):
    import core.optim
    from core.distributed import DistInfo
    from modules.stage_c import StageC
    from train.train_c import StageCTrainer

    calls = []
    real = StageC.set_gradient_checkpointing
    monkeypatch.setattr(StageC, "set_gradient_checkpointing", lambda self, on=True: (calls.append(on), real(self, on)))
    seen = []
    real_build = core.optim.build_optimizer
    monkeypatch.setattr(core.optim, "build_optimizer", lambda p, lr, cfg: (seen.append(cfg.optimizer),
                                                                           real_build(p, lr, cfg))[1])
    cfg = tiny_config(assets, tmp_path, frozen_dtype="bfloat16", optimizer="adafactor", gradient_checkpointing=True,
                      updates=1, save_every=1)
    trainer = StageCTrainer(cfg, dist=DistInfo())
    try:
        trainer.setup()
        assert seen == ["adafactor"] and type(trainer.optimizer).__name__ == "Adafactor"
        assert calls and calls[-1] is True      # (the constructor may switch it off first)
        for module in (trainer.effnet, trainer.previewer, trainer.text_model, trainer.image_model):
            assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in trainer.generator.parameters()} == {torch.float32}   # the trained one is not frozen
        trainer.micro_step = (1, 0)
        loss, _ = trainer.compute_loss(trainer.batches.next())
        assert torch.isfinite(loss) and loss.dtype == torch.float32
    finally:
        trainer.close()
    # default on CPU: float32 frozen parts
    assert StageCTrainer(tiny_config(assets, tmp_path), dist=DistInfo()).frozen_dtype == torch.float32
