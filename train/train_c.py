"""Stage C (text-conditional prior) finetuning / training.

    python3 train/train_c.py configs/training/finetune_c_3b.yaml [--set lr=2e-5] [--dry-run]

What one step does (docs: shared training.md §3):
* conditions: CLIP text of the caption (dropped to "" for 5 % of the samples), pooled CLIP text, and
  the CLIP image embedding of the training image for 10 % of the samples (zeros otherwise);
* target latents: EfficientNet encoder of the ImageNet-normalised images (frozen);
* loss: per-sample MSE against the noise, times the GDF loss weight (P2, or AdaptiveLossWeight when
  ``adaptive_loss_weight: true``).
Previews: samples for the config's ``preview_prompts``, decoded with the Previewer.

LoRA and ControlNet jobs subclass :class:`StageCTrainer` and override its hooks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path)

import torch
from torch import nn

from core.config import doc
from core.errors import UserError, run_cli
from core.training import TrainingConfig, TrainingCore


@dataclass
class StageCConfig(TrainingConfig):
    """Keys of a Stage C job (all official keys; see docs/CONFIG.md)."""

    text_dropout: float = doc(0.05, "Probability of replacing a caption by the empty string (CLIP('')) during training.")
    image_embed_prob: float = doc(0.1, "Probability of conditioning a sample on the CLIP image embedding of its own image (zeros otherwise).")
    cache_path: Optional[str] = doc(
        None, "Folder written by tools/cache_dataset.py: train from its cached EfficientNet latents and CLIP "
              "embeddings; the effnet and CLIP text/vision models are then never loaded (webdataset_path and the "
              "data keys are not read; caption dropout uses the cached CLIP(''); crops are the cached ones). "
              "None = encode the images every step.")

    def validate_stage_c(self) -> None:
        from modules.registry import MODEL_CONFIGS

        versions = list(MODEL_CONFIGS["stage_c"])
        if self.model_version not in versions:
            raise UserError(f"config key 'model_version': Stage C has versions {versions}, got '{self.model_version}'")
        if self.precision == "fp16" or self.dtype == "float16":
            raise UserError("fp16 is not supported for Stage C (activations overflow); use precision: bf16 or fp32 "
                            "and dtype: bfloat16 or float32")
        if self.training:
            self.require("previewer_checkpoint_path", why="Stage C training")
            if not self.cache_path:  # a cached run never loads the EfficientNet
                self.require("effnet_checkpoint_path", why="Stage C training")
        if self.cache_path and not self.validate_only and not os.path.isdir(self.cache_path):
            raise UserError(f"config key 'cache_path': folder not found: {self.cache_path} "
                            f"(write it with python3 tools/cache_dataset.py)")
        for key in ("effnet_checkpoint_path", "previewer_checkpoint_path", "generator_checkpoint_path",
                    "stage_b_checkpoint_path", "stage_a_checkpoint_path"):
            self.check_file(key)
        for key in ("text_dropout", "image_embed_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"config key '{key}' must be in [0, 1], got {getattr(self, key)}")


class StageCTrainer(TrainingCore):
    """Trains the Stage C generator; the hooks below are what LoRA/ControlNet jobs override."""

    Config = StageCConfig
    model_kind = "stage_c"
    description = "Finetune / train Stage C (text-conditional prior)."
    #: official training-preview sampling (gdf.md §8.2)
    preview_sampling = "stage_c_preview"

    @classmethod
    def model_layout(cls, cfg: Any) -> dict[str, tuple[str, str]]:
        return {"generator": ("stage_c", cfg.model_version), "effnet": ("effnet", "default"),
                "previewer": ("previewer", "default")}

    # -- models ---------------------------------------------------------------------------
    def build_models(self) -> None:
        from gdf import presets
        from modules.conditioning import load_clip_text, load_clip_vision, load_tokenizer
        from modules.loading import load_model

        cfg, dev = self.cfg, self.device
        self.gdf = presets.stage_c(adaptive_loss_weight=cfg.adaptive_loss_weight)
        self.generator = self.load_generator()  # first: a wrong checkpoint fails before the big loads
        self.previewer = self.to_frozen_dtype(load_model("previewer", "default", cfg.previewer_checkpoint_path,
                                                         device=dev))
        self.effnet = self.tokenizer = self.text_model = self.image_model = None
        self.uncond = None
        if cfg.cache_path:  # the cache holds the encoders' outputs: never construct them (memory, time)
            from train.stage_c_cache import load_unconditional

            self.uncond = load_unconditional(cfg.cache_path)
        else:
            self.effnet = self.to_frozen_dtype(load_model("effnet", "default", cfg.effnet_checkpoint_path, device=dev))
            self.effnet.to(memory_format=torch.channels_last)  # ~2-3x faster convolutions, same results
            self.tokenizer = load_tokenizer(cfg.clip_text_model_name)
            self.text_model = load_clip_text(cfg.clip_text_model_name, dtype=self.frozen_dtype, device=dev)
            self.image_model = load_clip_vision(cfg.clip_image_model_name, dtype=self.frozen_dtype, device=dev)
        self.stage_b = self.stage_a = None
        if cfg.stage_b_checkpoint_path and cfg.stage_a_checkpoint_path:  # full C -> B -> A previews
            self.stage_b = self._load_frozen_stage_b(cfg.stage_b_checkpoint_path)
            self.stage_a = load_model("stage_a", "default", cfg.stage_a_checkpoint_path, device=dev)

    def _load_frozen_stage_b(self, path: str) -> nn.Module:
        """Stage B for preview decodes; its model_version is read from the file's layout."""
        from safetensors import safe_open

        from modules.loading import load_model
        from modules.registry import describe_model_version

        shapes = {}
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as fh:
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        version = describe_model_version("stage_b", shapes) if shapes else None
        if version is None:
            raise UserError(f"config key 'stage_b_checkpoint_path': {path} is not a Stage B checkpoint "
                            f"(3B, 700M or tiny)")
        return load_model("stage_b", version, path, dtype=self.frozen_dtype, device=self.device)

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.effnet, self.previewer, self.text_model, self.image_model, self.stage_b,
                            self.stage_a) if m is not None]

    def build_pipeline(self, batch_size: int, state: Optional[dict]) -> Any:
        if not self.cfg.cache_path:
            return super().build_pipeline(batch_size, state)
        from train.stage_c_cache import build_cache_pipeline

        cfg = self.cfg
        return build_cache_pipeline(cfg.cache_path, batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
                                    seed=cfg.seed, num_workers=cfg.num_workers, state=state,
                                    shuffle_buffer=cfg.shuffle_buffer, strict=cfg.strict)

    # -- conditions and latents -------------------------------------------------------------
    def get_conditions(self, batch: dict, is_eval: bool = False, is_unconditional: bool = False,
                       eval_image_embeds: bool = False,
                       generators: Optional[list[torch.Generator]] = None) -> dict[str, Any]:
        """``clip_text``, ``clip_text_pooled``, ``clip_img`` (training.md §3.1).

        Training draws, per sample from its own generator: text kept iff rand > text_dropout, then
        image embedding used iff rand > 1 - image_embed_prob."""
        from modules.conditioning import encode_images_clip, encode_text

        captions = list(batch["captions"])
        n = len(captions)
        use_img = torch.zeros(n, dtype=torch.bool)
        if is_unconditional:
            captions = [""] * n
        elif not is_eval:
            generators = generators if generators is not None else self.sample_generators(n)
            for i, g in enumerate(generators):
                if torch.rand(1, generator=g).item() <= self.cfg.text_dropout:
                    captions[i] = ""
                use_img[i] = torch.rand(1, generator=g).item() > 1.0 - self.cfg.image_embed_prob
        elif eval_image_embeds:
            use_img[:] = True
        # frozen_dtype (bf16) encoder outputs -> the generator's input dtype (as the cache path gives)
        clip_text, clip_text_pooled = (t.to(self.model_dtype) for t in encode_text(self.tokenizer, self.text_model,
                                                                                    captions))
        c_img = self.image_model.config.projection_dim
        clip_img = torch.zeros(n, 1, c_img, device=self.device, dtype=clip_text.dtype)
        if use_img.any():
            idx = use_img.nonzero().flatten().tolist()
            images = batch["images"][idx].to(self.device)
            clip_img[idx] = encode_images_clip(self.image_model, images).to(clip_img.dtype)
        return {"clip_text": clip_text, "clip_text_pooled": clip_text_pooled, "clip_img": clip_img}

    def cached_conditions(self, batch: dict, generators: list[torch.Generator]) -> dict[str, Any]:
        """The conditions of a cached training batch, with the same per-sample draws (and order) as
        :meth:`get_conditions`; a dropped caption gets the cached CLIP('')."""
        from train.stage_c_cache import cached_conditions

        c_img = self.unwrapped("generator").clip_img_mapper.in_features
        return cached_conditions(batch, self.uncond, generators, self.cfg.text_dropout, self.cfg.image_embed_prob,
                                 c_img=c_img, device=self.device, dtype=self.model_dtype)

    def conditions_and_latents(self, batch: dict, generators: list[torch.Generator]) -> tuple[dict, torch.Tensor]:
        """Training conditions and target latents of a batch: from the frozen encoders, or from the
        cache (a batch with ``latents``). Conditions first: their draws precede the diffusion draws."""
        if "latents" in batch:
            return self.cached_conditions(batch, generators), batch["latents"].to(self.device).float()
        conditions = self.get_conditions(batch, generators=generators)
        return conditions, self.encode_latents(batch["images"].to(self.device))

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """EfficientNet latents of [0,1] images (ImageNet-normalised, frozen encoder, fp32)."""
        from modules.effnet import imagenet_normalize

        x = imagenet_normalize(images.float()).contiguous(memory_format=torch.channels_last)
        return self.effnet(x).float()

    # -- step -------------------------------------------------------------------------------
    def extra_model_inputs(self, batch: dict, conditions: dict) -> dict[str, Any]:
        """More generator inputs for a step (ControlNet: ``{'cnet': ...}``)."""
        return {}

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        generators = self.sample_generators(len(batch["captions"]))
        with torch.no_grad():
            conditions, latents = self.conditions_and_latents(batch, generators)
        conditions.update(self.extra_model_inputs(batch, conditions))
        loss, per_sample = self.diffusion_loss(
            self.gdf, lambda x, r: self.generator(x, r, **conditions), latents, generators)
        return loss, {"raw_loss": per_sample.mean()}

    # -- previews ---------------------------------------------------------------------------
    def sample_latents(self, model: nn.Module, conditions: dict, unconditions: dict,
                       shape: tuple[int, ...]) -> torch.Tensor:
        from gdf import presets

        settings = presets.sampling_kwargs(self.preview_sampling, self.gdf)
        x0 = None
        with self.autocast():
            for x0, _x, _pred in self.gdf.sample(model, conditions, shape, unconditions, device=self.device,
                                                 generator=self._preview_generator, **settings):
                pass
        return x0.float()

    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        if "latents" in batch:  # cached run: no text encoder for the preview prompts; use the cached captions
            cond, uncond = self.cached_preview_conditions(batch)
            reference = batch["latents"].to(self.device).float()
            n, (h, w) = len(reference), (reference.shape[-2] * 32, reference.shape[-1] * 32)
        else:
            n = self.cfg.num_preview_images
            prompts = [self.cfg.preview_prompts[i % len(self.cfg.preview_prompts)] for i in range(n)]
            cond = self.get_conditions({"captions": prompts}, is_eval=True)
            uncond = self.get_conditions({"captions": prompts}, is_eval=True, is_unconditional=True)
            h, w = batch["images"].shape[-2:]
            reference = self.encode_latents(batch["images"].to(self.device))
        shape = (n, 16, max(1, h // 32), max(1, w // 32))
        # What the Previewer makes of the real latents of the preview images: the best a sample can look.
        grids = {"reference": self.previewer(reference).float()}
        models = {"generator": self.unwrapped("generator")}
        if self.ema is not None:
            models["generator_ema"] = self.ema.module
        for name, model in models.items():
            latents = self.sample_latents(model, cond, uncond, shape)
            grids[name] = self.previewer(latents).float().clamp(0, 1)
            if self.stage_b is not None:
                grids[f"{name}_full"] = self.decode_full(latents, cond["clip_text_pooled"],
                                                         uncond["clip_text_pooled"], (h, w))
        return grids

    def cached_preview_conditions(self, batch: dict) -> tuple[dict, dict]:
        """Eval conditions (caption kept, no image embedding) and unconditions of cached samples."""
        n = len(batch["latents"])
        c_img = self.unwrapped("generator").clip_img_mapper.in_features
        text, pooled = batch["clip_text"], batch["clip_text_pooled"]
        zeros = torch.zeros(n, 1, c_img)
        cond = {"clip_text": text, "clip_text_pooled": pooled, "clip_img": zeros}
        uncond = {"clip_text": self.uncond["clip_text"].expand_as(text),
                  "clip_text_pooled": self.uncond["clip_text_pooled"].expand_as(pooled), "clip_img": zeros}
        to = dict(device=self.device, dtype=self.model_dtype)
        return {k: v.to(**to) for k, v in cond.items()}, {k: v.to(**to) for k, v in uncond.items()}

    def decode_full(self, latents_c: torch.Tensor, pooled: torch.Tensor, pooled_uncond: torch.Tensor,
                    size: tuple[int, int]) -> torch.Tensor:
        """Stage C latents -> Stage B sample (official inference settings) -> Stage A decode."""
        from gdf import presets

        gdf_b = presets.stage_b()
        settings = presets.sampling_kwargs("stage_b_inference", gdf_b)
        n = latents_c.shape[0]
        shape = (n, 4, size[0] // 4, size[1] // 4)
        cond = {"effnet": latents_c, "clip": pooled}
        uncond = {"effnet": torch.zeros_like(latents_c), "clip": pooled_uncond}
        x0 = None
        with self.autocast():
            for x0, _x, _pred in gdf_b.sample(self.stage_b, cond, shape, uncond, device=self.device,
                                              generator=self._preview_generator, **settings):
                pass
        return self.stage_a.decode(x0.float()).float().clamp(0, 1)


if __name__ == "__main__":
    run_cli(StageCTrainer.main)
