"""Encoder cache: the tool writes shards, the reader batches them, and a training loss computed
from the cache equals the loss computed from the images for the same samples and seeds."""
from __future__ import annotations


import pytest
import torch


from tests.helpers.cache_assets import tiny_config, tool_cache


@pytest.fixture(scope="module")
def assets(train_assets):
    """This module's name for the shared training assets (tests/conftest.py)."""
    return train_assets


@pytest.fixture(scope="module")
def cache_dir(assets, tmp_path_factory):
    cache, info = tool_cache(assets, tmp_path_factory.getbasetemp())
    assert info["samples"] == 16 and len(info["shards"]) == 4     # 8 photos x 2 variants, one pass
    return cache


def cached_by_key(cache_dir) -> dict[str, dict]:
    """Every cached sample (tensors without the batch dimension, caption) by key: one epoch of the
    cache pipeline with batches of one."""
    from train.stage_c_cache import build_cache_pipeline

    out: dict[str, dict] = {}
    with build_cache_pipeline(cache_dir, 1, seed=0, num_workers=0) as pipe:
        while True:
            b = next(pipe)
            if b["epoch"] > 0:
                return out
            out[b["keys"][0]] = {**{k: v[0] for k, v in b.items() if isinstance(v, torch.Tensor)},
                                 "caption": b["captions"][0]}


def collate(samples: list[dict]) -> dict:
    from train.stage_c_cache import FIELDS

    batch = {k: torch.stack([s[k] for s in samples]) for k in FIELDS if k in samples[0]}
    batch["captions"] = [s["caption"] for s in samples]
    return batch


def test_reader_yields_training_batches(cache_dir):
    from train.stage_c_cache import build_cache_pipeline, load_unconditional

    with build_cache_pipeline(cache_dir, 3, seed=0, num_workers=0) as pipe:
        batches = [next(pipe) for _ in range(7)]                   # past the 16 samples: epochs repeat
    b = batches[0]
    assert b["latents"].shape == (3, 16, 2, 2) and b["clip_text"].shape == (3, 77, 32)
    assert b["clip_text_pooled"].shape == (3, 1, 32) and b["clip_img"].shape == (3, 1, 24)
    assert all(b[k].dtype == torch.float32 for k in ("latents", "clip_text", "clip_text_pooled", "clip_img"))
    assert len(b["captions"]) == 3 and all(b["captions"]) and len(b["keys"]) == len(b["urls"]) == 3
    # 16 = 5 * 3 + 1: the 16th sample waits and opens epoch 1's first batch (batches are always full)
    assert [x["epoch"] for x in batches] == [0] * 5 + [1] * 2 and all(len(x["keys"]) == 3 for x in batches)
    assert batches[5]["sample_epochs"] == [0, 1, 1]
    uncond = load_unconditional(cache_dir)
    assert uncond["clip_text"].shape == (77, 32) and uncond["clip_text_pooled"].shape == (1, 32)


def test_loss_from_cache_equals_loss_from_images(assets, cache_dir, tmp_path):
    """Both losses come from the real trainer's compute_loss: one trainer encodes the images, the
    other (cache_path set) reads the cache and never builds the encoders."""
    from core.data import build_pipeline
    from core.distributed import DistInfo
    from train.train_c import StageCTrainer

    cfg = tiny_config(assets, tmp_path)
    trainer = StageCTrainer(cfg, dist=DistInfo())
    trainer.build_models()  # registered frozen parts are frozen on registration
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh Stage C has zero output layers; make the loss depend on everything
        for p in trainer.generator.parameters():
            p.normal_(0.0, 0.05)
    cached_trainer = StageCTrainer(tiny_config(assets, tmp_path, cache_path=str(cache_dir)), dist=DistInfo())
    cached_trainer.build_models()
    assert cached_trainer.text_model is None and cached_trainer.effnet is None and cached_trainer.image_model is None
    cached_trainer.generator.load_state_dict(trainer.generator.state_dict())
    batch = next(iter(build_pipeline(cfg, batch_size=4, seed=cfg.seed, num_workers=0)))

    # the cache pipeline reads in its own (shuffled) order: gather the same samples by key
    cached = cached_by_key(cache_dir)
    assert len(cached) == 16
    cbatch = collate([cached[k] for k in batch["keys"]])
    assert cbatch["captions"] == list(batch["captions"])

    def draws(step):
        from train.stage_c_conditions import condition_dropout

        trainer.micro_step = (step, 0)
        drop, use_img = condition_dropout(trainer.sample_generators(4), cfg.text_dropout, cfg.image_embed_prob)
        return list(zip(drop, use_img))

    # a step where some captions are dropped and some kept, and some samples use the image embedding
    step = next(s for s in range(1, 200) if 0 < sum(d for d, _ in draws(s)) < 4 and any(i for _, i in draws(s)))
    trainer.micro_step = cached_trainer.micro_step = (step, 0)
    torch.manual_seed(7)                                           # module dropout RNG
    loss_img, _ = trainer.compute_loss(batch)
    torch.manual_seed(7)
    loss_cache, _ = cached_trainer.compute_loss(cbatch)
    torch.testing.assert_close(loss_cache, loss_img, rtol=1e-5, atol=1e-7)
    print(f"loss from images {loss_img.item():.8f}, from cache {loss_cache.item():.8f}")


def test_lora_run_from_cache_never_builds_the_encoders(assets, cache_dir, tmp_path, monkeypatch):
    """A LoRA run (no train_tokens) from the cache: 2 updates, a checkpoint, a preview; constructing the
    CLIP text/vision models, the tokenizer or the EfficientNet raises."""
    import modules.conditioning as conditioning
    import modules.loading as loading
    from core.distributed import DistInfo
    from core.errors import UserError
    from train.train_c_lora import LoraConfig, StageCLoraTrainer

    def forbidden(*_a, **_k):
        raise AssertionError("an encoder was constructed in a cached run")

    for name in ("load_clip_text", "load_clip_vision", "load_tokenizer"):
        monkeypatch.setattr(conditioning, name, forbidden)
    monkeypatch.setattr(conditioning, "CLIPTextModelWithProjection", forbidden, raising=False)
    real_load_model = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda kind, *a, **k: forbidden() if kind == "effnet"
                        else real_load_model(kind, *a, **k))
    extra = dict(config_cls=LoraConfig, yaml_file="tiny_c_lora.yaml", train_tokens=None, export_comfyui=False,
                 generator_checkpoint_path=None, updates=2, save_every=2, num_preview_images=2)
    cfg = tiny_config(assets, tmp_path, cache_path=str(cache_dir), **extra)
    trainer = StageCLoraTrainer(cfg, dist=DistInfo())
    try:
        trainer.run()
    finally:
        trainer.close()
    assert trainer.step == 2 and trainer.text_model is None
    run = tmp_path / "ck" / cfg.experiment_id
    assert (run / "lora.safetensors").is_file()
    assert any((tmp_path / "out" / cfg.experiment_id).rglob("*.png"))   # the preview ran from the cache
    # token training needs the text encoder: refused at config time
    with pytest.raises(UserError, match="cache_path.*train_tokens"):
        tiny_config(assets, tmp_path, cache_path=str(cache_dir), **{**extra, "train_tokens": [["[t]", "^dog</w>"]]})


def test_backups_when_a_backup_every_boundary_is_crossed(assets, cache_dir, tmp_path):
    """save_every 3, backup_every 4: saves at 3, 6, 9; boundaries 4 and 8 are crossed by the saves at
    6 and 9, so both back up (the reference only backed up when step % 4 == 0 fell on a save: 12)."""
    from core.distributed import DistInfo
    from train.train_c_lora import LoraConfig, StageCLoraTrainer

    cfg = tiny_config(assets, tmp_path, config_cls=LoraConfig, yaml_file="tiny_c_lora.yaml", train_tokens=None,
                      export_comfyui=False, generator_checkpoint_path=None, cache_path=str(cache_dir),
                      updates=9, save_every=3, backup_every=4, preview_every=0, keep_last=1)
    trainer = StageCLoraTrainer(cfg, dist=DistInfo())
    try:
        trainer.run()
    finally:
        trainer.close()
    run = tmp_path / "ck" / cfg.experiment_id
    names = {p.name for p in run.rglob("*.safetensors")}
    assert {"lora_6.safetensors", "lora_9.safetensors"} <= names, sorted(names)   # the LoRA job's published copies
    assert not any(n.startswith("lora_3") for n in names), sorted(names)
    assert "lora_official_6.safetensors" in names


def test_cached_run_resumes_exactly_across_epochs(assets, cache_dir, tmp_path):
    """A Stage C run from the cache (16 samples, batch 4: an epoch every 4 updates), stopped after 3
    updates and resumed to 6, gives the losses and weights of the run that never stopped."""
    import json

    from safetensors.torch import load_file

    from core.distributed import DistInfo
    from train.train_c import StageCTrainer

    def run(root, updates):
        cfg = tiny_config(assets, root, cache_path=str(cache_dir), generator_checkpoint_path=None, updates=updates,
                          save_every=3, preview_every=0, log_every=1, experiment_id="cached")
        trainer = StageCTrainer(cfg, dist=DistInfo(), resume="auto")
        try:
            trainer.run()
        finally:
            trainer.close()
        folder = root / "ck" / "cached"
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in lines if "loss" in r}, load_file(str(folder / "generator.safetensors"))

    straight_losses, straight = run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 3)
    resumed_losses, resumed = run(tmp_path / "resumed", 6)
    assert sorted(straight_losses) == list(range(1, 7))
    assert resumed_losses == straight_losses
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
