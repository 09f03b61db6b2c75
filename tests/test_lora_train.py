"""End-to-end LoRA (+ token) training on CPU: tiny Stage C, real photo shards, no mocks.

One straight run and one interrupted+resumed run; the checks share them (module fixtures)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers.adapter_assets import cli_args, losses, overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = str(ROOT / "configs/training/tiny_c_lora.yaml")
TOKENS = [["[tinytok]", "^dog</w>"], ["^photo</w>", None]]
COMMON = dict(updates=4, save_every=2, lr=1.0e-2, rank=2, train_tokens=TOKENS, export_comfyui=True)


def _trainer(assets, root, experiment_id, **extra):
    from core.config import load_config
    from core.distributed import init_distributed
    from train.train_c_lora import LoraConfig, StageCLoraTrainer

    cfg = load_config(LoraConfig, CONFIG, overrides(assets, root, experiment_id=experiment_id, **{**COMMON, **extra}))
    return StageCLoraTrainer(cfg, dist=init_distributed(), resume="auto")


@pytest.fixture(scope="module")
def assets(adapter_assets):
    """This module's name for the shared adapter assets (tests/conftest.py)."""
    return adapter_assets


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    """A finished 4-update run; the trainer object stays alive for inspection."""
    root = tmp_path_factory.mktemp("lora_straight")
    trainer = _trainer(assets, root, "straight")
    trainer.setup()
    before = _eval_loss(trainer, enabled=True)  # zero-initialised LoRA and token deltas
    trainer.train()
    trainer.close()
    return trainer, root / "ck" / "straight", before


@torch.no_grad()
def _eval_loss(trainer, enabled: bool) -> float:
    """Diffusion loss on the 4 training images with fixed noise and t (an overfitting check)."""
    from core.data import build_pipeline

    for _, lora in trainer.loras:
        lora.enabled = enabled
    trainer.retoken.enabled = enabled
    try:
        pipe = build_pipeline(trainer.cfg, batch_size=4, num_workers=0)
        batch = next(iter(pipe))
        cond = trainer.get_conditions(batch, is_eval=True)
        latents = trainer.encode_latents(batch["images"])
        g = torch.Generator().manual_seed(0)
        total = 0.0
        for _ in range(8):
            noised, _eps, target, _snr, noise_cond, _w = trainer.gdf.diffuse(latents, generator=g)
            pred = trainer.unwrapped("generator").eval()(noised, noise_cond, **cond)
            total += float((pred - target).pow(2).mean())
        return total / 8
    finally:
        for _, lora in trainer.loras:
            lora.enabled = True
        trainer.retoken.enabled = True


def test_lora_run_writes_named_official_and_comfyui_files(straight):
    trainer, run, _ = straight
    for name in ("lora.safetensors", "lora_official.safetensors", "lora_comfyui.safetensors",
                 "lora_comfyui_embeddings.safetensors", "tokens.json", "latest", "metrics.jsonl"):
        assert (run / name).is_file(), name
    with safe_open(str(run / "lora.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["rank"] == "2" and float(meta["alpha"]) == 1.0 and meta["model_version"] == "tiny"
    assert meta["step"] == "4" and json.loads(meta["module_filters"]) == [".attn"]
    assert json.loads(meta["train_tokens"]) == TOKENS and "[tinytok]" in json.loads(meta["tokens"])
    assert "down_blocks.0.2.attention.attn.in_proj_weight.lora_down" in keys
    tokens = json.loads((run / "tokens.json").read_text())
    assert tokens["new_tokens"][0]["token"] == "[tinytok]" and tokens["new_tokens"][0]["id"] == 49408
    assert tokens["ids"] == sorted(tokens["ids"])
    emb = load_file(run / "lora_comfyui_embeddings.safetensors")["clip_g"]
    assert emb.shape == (len(tokens["ids"]), 32)


def test_frozen_base_and_other_token_rows_bitwise_unchanged(straight, assets):
    from modules.conditioning import load_clip_text
    from modules.lora import LoRA

    trainer, run, _ = straight
    base = load_file(assets / "stage_c_tiny.safetensors")
    gen = trainer.unwrapped("generator")
    for name, p in gen.named_parameters():
        if ".lora_" in name:
            continue
        plain = name.replace(".parametrizations.", ".").replace(".original", "")
        assert torch.equal(p.detach(), base[plain]), name
        assert not p.requires_grad
    assert any(isinstance(m, LoRA) for m in gen.modules())
    fresh = load_clip_text(str(assets / "clip/text")).get_input_embeddings().weight
    trained = trainer.text_model.get_input_embeddings().weight.detach()
    ids = trainer.retoken.indices.tolist()
    keep = torch.ones(trained.shape[0], dtype=torch.bool)
    keep[ids] = False
    keep[fresh.shape[0]:] = False
    assert torch.equal(trained[:fresh.shape[0]][keep[:fresh.shape[0]]], fresh[keep[:fresh.shape[0]]])
    assert trainer.retoken.embeddings.detach().abs().sum(1).gt(0).all(), "every trained row moved"
    assert trained.shape[0] == fresh.shape[0] + 1


def test_lora_loss_falls_on_the_overfitting_set(straight):
    trainer, _, before = straight
    after = _eval_loss(trainer, enabled=True)
    assert after < before * 0.95, (before, after)


def test_lora_resume_is_exact(straight, assets, tmp_path):
    from train.train_c_lora import StageCLoraTrainer

    _, run_a, _ = straight
    args = cli_args(CONFIG, assets, tmp_path, experiment_id="resumed", **{**COMMON, "updates": 2})
    assert StageCLoraTrainer.main(args) == 0
    args = cli_args(CONFIG, assets, tmp_path, experiment_id="resumed", **COMMON)
    assert StageCLoraTrainer.main(args) == 0
    run_b = tmp_path / "ck" / "resumed"
    la, lb = losses(run_a), losses(run_b)
    assert [la[s] for s in (3, 4)] == [lb[s] for s in (3, 4)]
    a, b = load_file(run_a / "lora.safetensors"), load_file(run_b / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_merge_tool_equals_unmerged_and_export_tool(straight, assets, tmp_path):
    from modules.loading import load_model
    from tools.lora_export import main as export_main
    from tools.lora_merge import main as merge_main

    trainer, run, _ = straight
    for src in ("lora.safetensors", "lora_official.safetensors", "lora_comfyui.safetensors"):
        out = tmp_path / f"merged_{src}"
        assert merge_main(["--base", str(assets / "stage_c_tiny.safetensors"), "--lora", str(run / src),
                           "--out", str(out)]) == 0
        merged = load_model("stage_c", "tiny", out).eval()
        g = torch.Generator().manual_seed(3)
        x = (torch.randn(2, 16, 2, 2, generator=g), torch.rand(2, generator=g), torch.randn(2, 77, 32, generator=g),
             torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 24, generator=g))
        with torch.no_grad():
            ref = trainer.unwrapped("generator").eval()(*x)
            torch.testing.assert_close(merged(*x), ref, rtol=1e-4, atol=1e-5)
    out = tmp_path / "comfy.safetensors"
    assert export_main([str(run / "lora.safetensors"), "--out", str(out),
                        "--clip-text-model", str(assets / "clip/text")]) == 0
    exported, shipped = load_file(out), load_file(run / "lora_comfyui.safetensors")
    assert exported.keys() == shipped.keys()
    for k in exported:
        torch.testing.assert_close(exported[k], shipped[k])
    torch.testing.assert_close(load_file(tmp_path / "comfy_embeddings.safetensors")["clip_g"],
                               load_file(run / "lora_comfyui_embeddings.safetensors")["clip_g"])


def test_lora_checkpoint_path_loads_an_official_layout_lora(straight, assets, tmp_path):
    # (named and ComfyUI files load through the same code: tests/test_lora_io.py)
    _, run, _ = straight
    trainer = _trainer(assets, tmp_path, "from_official", lora_checkpoint_path=str(run / "lora_official.safetensors"))
    trainer.build_models()
    ours = trainer.lora_state_dict()
    ref = load_file(run / "lora.safetensors")
    assert ours.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=1e-7)


def test_kohya_lora_and_diffusers_generator_folder_load_in_training(straight, assets, tmp_path):
    """``lora_checkpoint_path`` takes the kohya layout and ``generator_checkpoint_path`` a diffusers
    StableCascadeUNet folder (config validation and loading; the conversions: test_lora_kohya.py,
    test_diffusers_format.py)."""
    from modules.diffusers_format import save_diffusers
    from fileio.state_dicts import read_state_dict
    from tools.lora_export import export_file

    trained, run, _ = straight
    kohya = tmp_path / "kohya.safetensors"
    export_file(str(run / "lora.safetensors"), str(kohya), clip_text_model=str(assets / "clip/text"), fmt="kohya")
    folder = save_diffusers(read_state_dict(assets / "stage_c_tiny.safetensors"), "stage_c", "tiny", tmp_path / "prior")
    trainer = _trainer(assets, tmp_path, "from_kohya", lora_checkpoint_path=str(kohya),
                       generator_checkpoint_path=str(folder))
    trainer.build_models()
    ours, ref = trainer.lora_state_dict(), load_file(run / "lora.safetensors")
    for k, v in ref.items():
        if not k.startswith("embeddings."):  # token rows are not part of a kohya file
            assert torch.equal(ours[k], v), k
    base = {n: p for n, p in trained.unwrapped("generator").named_parameters() if "lora" not in n}
    loaded = dict(trainer.unwrapped("generator").named_parameters())
    assert base and all(torch.equal(loaded[n], p) for n, p in base.items())
