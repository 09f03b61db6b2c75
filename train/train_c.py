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

    def validate_stage_c(self) -> None:
        from modules.registry import MODEL_CONFIGS

        versions = list(MODEL_CONFIGS["stage_c"])
        if self.model_version not in versions:
            raise UserError(f"config key 'model_version': Stage C has versions {versions}, got '{self.model_version}'")
        if self.precision == "fp16" or self.dtype == "float16":
            raise UserError("fp16 is not supported for Stage C (activations overflow); use precision: bf16 or fp32 "
                            "and dtype: bfloat16 or float32")
        if self.training:
            self.require("effnet_checkpoint_path", "previewer_checkpoint_path", why="Stage C training")
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
        self.effnet = load_model("effnet", "default", cfg.effnet_checkpoint_path, device=dev)
        self.effnet.to(memory_format=torch.channels_last)  # ~2-3x faster convolutions, same results
        self.previewer = load_model("previewer", "default", cfg.previewer_checkpoint_path, device=dev)
        self.tokenizer = load_tokenizer(cfg.clip_text_model_name)
        self.text_model = load_clip_text(cfg.clip_text_model_name, dtype=self.model_dtype, device=dev)
        self.image_model = load_clip_vision(cfg.clip_image_model_name, dtype=self.model_dtype, device=dev)
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
        dtype = torch.bfloat16 if self.autocast_dtype == torch.bfloat16 else torch.float32
        return load_model("stage_b", version, path, dtype=dtype, device=self.device)

    def frozen_modules(self) -> list[nn.Module]:
        extra = [m for m in (self.stage_b, self.stage_a) if m is not None]
        return [self.effnet, self.previewer, self.text_model, self.image_model, *extra]

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
        clip_text, clip_text_pooled = encode_text(self.tokenizer, self.text_model, captions)
        c_img = self.image_model.config.projection_dim
        clip_img = torch.zeros(n, 1, c_img, device=self.device, dtype=clip_text.dtype)
        if use_img.any():
            idx = use_img.nonzero().flatten().tolist()
            images = batch["images"][idx].to(self.device)
            clip_img[idx] = encode_images_clip(self.image_model, images).to(clip_img.dtype)
        return {"clip_text": clip_text, "clip_text_pooled": clip_text_pooled, "clip_img": clip_img}

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
        images = batch["images"].to(self.device)
        generators = self.sample_generators(len(images))
        with torch.no_grad():
            conditions = self.get_conditions(batch, generators=generators)
            latents = self.encode_latents(images)
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
        n = self.cfg.num_preview_images
        prompts = [self.cfg.preview_prompts[i % len(self.cfg.preview_prompts)] for i in range(n)]
        cond = self.get_conditions({"captions": prompts}, is_eval=True)
        uncond = self.get_conditions({"captions": prompts}, is_eval=True, is_unconditional=True)
        h, w = batch["images"].shape[-2:]
        shape = (n, 16, max(1, h // 32), max(1, w // 32))
        # What the Previewer makes of the real latents of the preview images: the best a sample can look.
        grids = {"reference": self.previewer(self.encode_latents(batch["images"].to(self.device))).float()}
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
