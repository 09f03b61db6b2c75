"""Every job registers what it builds, and the core freezes what does not train.

Each of the four jobs is set up (data, models, wrapping, optimizer) with every optional part
configured: full C -> B -> A previews, the CLIP image model, EMA, train_tokens, the encoder cache.
Every network it built is registered; each one that does not train (and each sub-module of a
trained one that is not itself trained) is in eval mode with no parameter requiring grad.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers.adapter_assets import STAGE_C_ONLY, overrides
from tests.helpers.cache_assets import tool_cache

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [["[tinytok]", "^dog</w>"]]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stage_b_file(tmp_path_factory) -> Path:
    from fileio.state_dicts import save_safetensors
    from modules.registry import build_model

    path = tmp_path_factory.mktemp("stage_b") / "stage_b_tiny.safetensors"
    save_safetensors(build_model("stage_b", "tiny"), path)
    return path


@pytest.fixture(scope="module")
def cache_dir(train_assets, tmp_path_factory) -> Path:
    return tool_cache(train_assets, tmp_path_factory.getbasetemp())[0]


def _setup(module: str, cls: str, config: str, sets: list[str]):
    import importlib

    from core.config import load_config
    from core.distributed import init_distributed

    trainer_cls = getattr(importlib.import_module(module), cls)
    cfg = load_config(trainer_cls.Config, str(ROOT / "configs/training" / config), sets)
    trainer = trainer_cls(cfg, dist=init_distributed(), resume="never")
    trainer.setup()
    return trainer


def _check(trainer) -> dict[str, list[str]]:
    """Assert the freezing contract; returns {'trained': [...], 'frozen': [...]} names."""
    trained, frozen = trainer.trained_modules(), trainer.frozen_modules()
    built = sorted(k for k, v in vars(trainer).items() if isinstance(v, nn.Module))
    assert built == sorted(trained + frozen), "a built network is not registered"
    trained_params = {id(p) for p in trainer.trainable_parameters()}
    trained_subs = {id(m) for n in trained for m in trainer.unwrapped(n).modules()}
    assert trained_params, "nothing trains"
    for name in frozen:
        for sub, m in getattr(trainer, name).named_modules():
            assert id(m) in trained_subs or not m.training, f"{name}.{sub} is in train mode"
        for pname, p in getattr(trainer, name).named_parameters():
            assert id(p) in trained_params or not p.requires_grad, f"{name}.{pname} requires grad"
    for name in trained:  # inside a trained network only the registered trainable parameters train
        for pname, p in trainer.unwrapped(name).named_parameters():
            assert id(p) in trained_params or not p.requires_grad, f"{name}.{pname} requires grad"
    if trainer.ema is not None:
        assert not trainer.ema.module.training and not any(p.requires_grad for p in trainer.ema.module.parameters())
    return {"trained": trained, "frozen": frozen}


def _full_preview_keys(adapter_assets: Path, stage_b_file: Path) -> dict:
    return {"stage_b_checkpoint_path": str(stage_b_file),
            "stage_a_checkpoint_path": str(adapter_assets / "stage_a.safetensors")}


def test_stage_c_with_full_previews_and_ema(adapter_assets, stage_b_file, tmp_path):
    sets = overrides(adapter_assets, tmp_path, experiment_id="c", ema_start_iters=1, ema_iters=1, ema_beta=0.9,
                     **_full_preview_keys(adapter_assets, stage_b_file))
    trainer = _setup("train.train_c", "StageCTrainer", "tiny_c.yaml", sets)
    try:
        names = _check(trainer)
        assert names["trained"] == ["generator"]
        assert set(names["frozen"]) == {"previewer", "effnet", "text_model", "image_model", "stage_b", "stage_a"}
    finally:
        trainer.close()


def test_stage_c_from_the_cache(train_assets, cache_dir, tmp_path):
    sets = overrides(train_assets, tmp_path, experiment_id="cached", cache_path=str(cache_dir),
                     generator_checkpoint_path=None)
    trainer = _setup("train.train_c", "StageCTrainer", "tiny_c.yaml", sets)
    try:
        names = _check(trainer)
        assert names["frozen"] == ["previewer"]  # no encoders are built from a cache
    finally:
        trainer.close()


def test_lora_with_tokens_and_full_previews(adapter_assets, stage_b_file, tmp_path):
    """The reported defect: the LoRA job left the preview Stage B in train mode with gradients."""
    sets = overrides(adapter_assets, tmp_path, experiment_id="lora", train_tokens=TOKENS,
                     **_full_preview_keys(adapter_assets, stage_b_file))
    trainer = _setup("train.train_c_lora", "StageCLoraTrainer", "tiny_c_lora.yaml", sets)
    try:
        names = _check(trainer)
        assert names["trained"] == ["generator", "retoken"]
        assert {"stage_b", "stage_a", "text_model", "image_model"} <= set(names["frozen"])
        # the generator's own weights stay frozen; the LoRAs and the token rows train
        n_train = sum(p.numel() for p in trainer.trainable_parameters())
        n_lora = sum(p.numel() for _, lora in trainer.loras for p in lora.parameters())
        assert n_train == n_lora + trainer.retoken.embeddings.numel()
    finally:
        trainer.close()


def test_lora_from_the_cache(train_assets, cache_dir, tmp_path):
    sets = overrides(train_assets, tmp_path, experiment_id="lora_cached", cache_path=str(cache_dir),
                     generator_checkpoint_path=None, train_tokens=None)
    trainer = _setup("train.train_c_lora", "StageCLoraTrainer", "tiny_c_lora.yaml", sets)
    try:
        names = _check(trainer)
        assert names == {"trained": ["generator"], "frozen": ["previewer"]}
    finally:
        trainer.close()


def test_controlnet_with_full_previews(adapter_assets, stage_b_file, tmp_path):
    sets = overrides(adapter_assets, tmp_path, experiment_id="cnet", **_full_preview_keys(adapter_assets, stage_b_file))
    trainer = _setup("train.train_c_controlnet", "StageCControlNetTrainer", "tiny_c_controlnet_canny.yaml", sets)
    try:
        names = _check(trainer)
        assert names["trained"] == ["controlnet"]
        assert {"generator", "stage_b", "stage_a", "effnet"} <= set(names["frozen"])
    finally:
        trainer.close()


def test_stage_b(adapter_assets, tmp_path):
    sets = overrides(adapter_assets, tmp_path, drop=STAGE_C_ONLY, experiment_id="b", generator_checkpoint_path=None,
                     stage_a_checkpoint_path=str(adapter_assets / "stage_a.safetensors"))
    trainer = _setup("train.train_b", "StageBTrainer", "tiny_b.yaml", sets)
    try:
        names = _check(trainer)
        assert names == {"trained": ["generator"], "frozen": ["effnet", "stage_a", "text_model"]}
    finally:
        trainer.close()


def test_an_unregistered_network_is_refused(adapter_assets, tmp_path):
    """A job that builds a network without registering it fails at set-up, naming it."""
    from train.train_c import StageCTrainer

    class Sloppy(StageCTrainer):
        def build_models(self) -> None:
            super().build_models()
            self.extra = torch.nn.Dropout(0.5)

    from core.config import load_config
    from core.distributed import init_distributed

    cfg = load_config(Sloppy.Config, str(ROOT / "configs/training/tiny_c.yaml"),
                      overrides(adapter_assets, tmp_path, experiment_id="sloppy"))
    trainer = Sloppy(cfg, dist=init_distributed(), resume="never")
    try:
        with pytest.raises(RuntimeError, match="extra"):
            trainer.setup()
    finally:
        trainer.close()
