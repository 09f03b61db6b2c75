"""Stage B (latent decoder) training: image reconstruction in Stage A's latent space.

    python3 train/train_b.py configs/training/finetune_b_3b.yaml [--set lr=2e-5] [--dry-run]

What one step does (docs: shared training.md §6):
* target latents: Stage A encoder output of the image (unquantised, / 0.43), frozen;
* conditions: EfficientNet latents of a copy downscaled by ONE factor U(0.5, 1) per batch (nearest,
  multiples of 32), zeroed for 10 % of the samples, and the pooled CLIP text embedding of the caption
  (empty caption for 5 %);
* noise: pyramid noise (multi-scale), which is also the prediction target.
Previews: reconstructions of a fixed batch next to the originals (Stage B sample -> Stage A decode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path)

import torch
import torch.nn.functional as F
from torch import nn

from core.config import doc
from core.errors import UserError, run_cli
from core.training import TrainingConfig, TrainingCore


@dataclass
class StageBConfig(TrainingConfig):
    """Keys of a Stage B job (all official keys; see docs/CONFIG.md)."""

    text_dropout: float = doc(0.05, "Probability of replacing a caption by the empty string during training.")
    effnet_dropout: float = doc(0.1, "Probability of replacing a sample's EfficientNet condition by zeros during training.")

    def validate_stage_b(self) -> None:
        from modules.registry import MODEL_CONFIGS

        versions = list(MODEL_CONFIGS["stage_b"])
        if self.model_version not in versions:
            raise UserError(f"config key 'model_version': Stage B has versions {versions}, got '{self.model_version}'")
        if self.training:
            self.require("effnet_checkpoint_path", "stage_a_checkpoint_path", why="Stage B training")
        for key in ("effnet_checkpoint_path", "stage_a_checkpoint_path", "generator_checkpoint_path"):
            self.check_file(key)
        for key in ("text_dropout", "effnet_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"config key '{key}' must be in [0, 1], got {getattr(self, key)}")


class StageBTrainer(TrainingCore):
    """Trains the Stage B generator."""

    Config = StageBConfig
    model_kind = "stage_b"
    description = "Finetune / train Stage B (image reconstruction from Stage A latents)."
    preview_sampling = "stage_b_preview"

    @classmethod
    def model_layout(cls, cfg: Any) -> dict[str, tuple[str, str]]:
        return {"generator": ("stage_b", cfg.model_version), "effnet": ("effnet", "default"),
                "stage_a": ("stage_a", "default")}

    # -- models ---------------------------------------------------------------------------
    def build_models(self) -> None:
        from gdf import presets
        from modules.conditioning import load_clip_text, load_tokenizer
        from modules.loading import load_model

        cfg, dev = self.cfg, self.device
        self.gdf = presets.stage_b(adaptive_loss_weight=cfg.adaptive_loss_weight)
        self.generator = self.load_generator()  # first: a wrong checkpoint fails before the big loads
        self.effnet = self.to_frozen_dtype(load_model("effnet", "default", cfg.effnet_checkpoint_path, device=dev))
        self.effnet.to(memory_format=torch.channels_last)  # ~2-3x faster convolutions, same results
        self.stage_a = load_model("stage_a", "default", cfg.stage_a_checkpoint_path, device=dev)
        self.tokenizer = load_tokenizer(cfg.clip_text_model_name)
        self.text_model = load_clip_text(cfg.clip_text_model_name, dtype=self.frozen_dtype, device=dev)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.effnet, self.stage_a, self.text_model]

    # -- conditions and latents -------------------------------------------------------------
    def encode_effnet(self, images: torch.Tensor) -> torch.Tensor:
        from modules.effnet import imagenet_normalize

        x = imagenet_normalize(images.float()).contiguous(memory_format=torch.channels_last)
        return self.effnet(x).float()

    def get_conditions(self, batch: dict, is_eval: bool = False, is_unconditional: bool = False,
                       generators: Optional[list[torch.Generator]] = None) -> dict[str, Any]:
        """``effnet`` and ``clip`` (training.md §6.2)."""
        from modules.conditioning import encode_text

        images = batch["images"].to(self.device)
        captions = list(batch["captions"])
        n, _, h, w = images.shape
        if is_unconditional:
            effnet = torch.zeros(n, 16, h // 32, w // 32, device=self.device)
            captions = [""] * n
        elif is_eval:
            effnet = self.encode_effnet(images)
        else:
            generators = generators if generators is not None else self.sample_generators(n)
            f = 0.5 + 0.5 * torch.rand(1, generator=self.batch_generator("effnet-scale")).item()
            he, we = int((h * f) // 32) * 32, int((w * f) // 32) * 32
            he, we = max(he, 32), max(we, 32)
            effnet = torch.zeros(n, 16, he // 32, we // 32, device=self.device)
            keep = []
            for i, g in enumerate(generators):
                keep.append(torch.rand(1, generator=g).item() > self.cfg.effnet_dropout)
                if torch.rand(1, generator=g).item() <= self.cfg.text_dropout:
                    captions[i] = ""
            idx = [i for i, k in enumerate(keep) if k]
            if idx:
                small = F.interpolate(images[idx].float(), size=(he, we), mode="nearest")
                effnet[idx] = self.encode_effnet(small)
        clip = encode_text(self.tokenizer, self.text_model, captions)[1].to(self.model_dtype)  # frozen_dtype -> generator
        return {"effnet": effnet, "clip": clip}

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Stage A latents (unquantised / 0.43) of [0,1] images."""
        return self.stage_a.encode(images.float())[0].float()

    # -- step -------------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        from gdf import pyramid_noise

        images = batch["images"].to(self.device)
        generators = self.sample_generators(len(images))
        with torch.no_grad():
            conditions = self.get_conditions(batch, generators=generators)
            latents = self.encode_latents(images)
            epsilon = torch.cat([
                pyramid_noise(torch.randn(latents[i:i + 1].shape, generator=g).to(self.device), generator=g)
                for i, g in enumerate(generators)])
        loss, per_sample = self.diffusion_loss(
            self.gdf, lambda x, r: self.generator(x, r, **conditions), latents, generators, epsilon=epsilon)
        return loss, {"raw_loss": per_sample.mean()}

    # -- previews ---------------------------------------------------------------------------
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        from gdf import presets

        images = batch["images"].to(self.device).float()
        cond = self.get_conditions(batch, is_eval=True)
        uncond = self.get_conditions(batch, is_eval=True, is_unconditional=True)
        n, _, h, w = images.shape
        shape = (n, 4, h // 4, w // 4)
        settings = presets.sampling_kwargs(self.preview_sampling, self.gdf)
        models = {"generator": self.unwrapped("generator")}
        if self.ema is not None:
            models["generator_ema"] = self.ema.module
        grids = {}
        for name, model in models.items():
            x0 = None
            with self.autocast():
                for x0, _x, _pred in self.gdf.sample(model, cond, shape, uncond, device=self.device,
                                                     generator=self._preview_generator, **settings):
                    pass
            recon = self.stage_a.decode(x0.float()).float().clamp(0, 1)
            grids[name] = torch.cat([images.clamp(0, 1), recon])  # originals row, reconstructions row
        return grids


if __name__ == "__main__":
    run_cli(StageBTrainer.main)
