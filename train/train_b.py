"""Stage B (latent decoder) training: image reconstruction in Stage A's latent space.

    python3 train/train_b.py configs/training/finetune_b_3b.yaml [--set lr=2e-5] [--dry-run]

What one step does (docs/OFFICIAL.md, Stage B):
* target latents: Stage A encoder output of the image (unquantised, / 0.43), frozen;
* conditions: EfficientNet latents of a copy downscaled by ONE factor U(0.5, 1) per batch (nearest,
  multiples of 32), zeroed for 10 % of the samples, and the pooled CLIP text embedding of the caption
  (empty caption for 5 %);
* noise: pyramid noise (multi-scale), which is also the prediction target.
Previews: reconstructions of a fixed batch next to the originals (Stage B sample -> Stage A decode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn, Optional

import torch
import torch.nn.functional as F

from core.config import doc
from core.errors import run_cli
from train.cascade import CascadeConfig, CascadeTrainer
from train.memory_specs import stage_b_spec


@dataclass
class StageBConfig(CascadeConfig):
    """Keys of a Stage B job (all official keys; see docs/CONFIG.md)."""

    effnet_dropout: float = doc(0.1, "Probability of replacing a sample's EfficientNet condition by zeros during training.")

    def validate_stage_b(self) -> None:
        self.check_versions("stage_b", "Stage B")
        if self.training:
            self.require("effnet_checkpoint_path", "stage_a_checkpoint_path", why="Stage B training")
        for key in ("effnet_checkpoint_path", "stage_a_checkpoint_path", "generator_checkpoint_path"):
            # a diffusers StableCascadeUNet folder is a generator checkpoint too (modules/diffusers_format.py)
            self.check_file(key, folder_ok=key == "generator_checkpoint_path")
        self.check_fraction("effnet_dropout")


class StageBTrainer(CascadeTrainer):
    """Trains the Stage B generator."""

    Config = StageBConfig
    model_kind = "stage_b"
    description = "Finetune / train Stage B (image reconstruction from Stage A latents)."
    preview_sampling = "stage_b_preview"
    preview_decoder = "stage_a"

    memory_spec = staticmethod(stage_b_spec)  # the dry run's per-rank memory estimate

    # -- models ---------------------------------------------------------------------------
    def build_models(self) -> None:
        from modules.conditioning import load_clip_text, load_tokenizer
        from modules.loading import load_model

        cfg, dev = self.cfg, self.device
        self.setup_loss()
        self.add_trained("generator", self.load_generator(), save_as="generator")  # first: fails fast
        self.add_frozen("effnet", self.load_effnet())
        self.add_frozen("stage_a", load_model("stage_a", "default", cfg.stage_a_checkpoint_path, device=dev),
                        cast=False)  # 20M parameters: float32
        self.tokenizer = load_tokenizer(cfg.clip_text_model_name)
        self.add_frozen("text_model", load_clip_text(cfg.clip_text_model_name, dtype=self.frozen_dtype, device=dev),
                        quantize=True)  # base_dtype

    # -- conditions and latents -------------------------------------------------------------
    def get_conditions(self, batch: dict, is_eval: bool = False, is_unconditional: bool = False,
                       generators: Optional[list[torch.Generator]] = None) -> dict[str, Any]:
        """``effnet`` and ``clip`` (docs/OFFICIAL.md, Stage B)."""
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
        loss, per_sample = self.loss(lambda x, r: self.generator(x, r, **conditions), latents, generators,
                                     epsilon=epsilon, pixel_weight=self.pixel_weights(batch, latents))
        return loss, {"raw_loss": per_sample.mean()}

    # -- validation (core/validation.py) ----------------------------------------------------
    def validation_losses(self, sample: dict, t: torch.Tensor, generator: torch.Generator,
                          model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """One held-out sample at the times ``t``: eval conditions (full-size EfficientNet latents,
        caption kept: no dropout), pyramid noise from the sample's generator as in training."""
        from gdf import pyramid_noise
        from train.diffusion_loss import repeat_inputs

        conditions = repeat_inputs(self.get_conditions(sample, is_eval=True), len(t))
        latents = self.encode_latents(sample["images"].to(self.device))
        epsilon = torch.cat([pyramid_noise(torch.randn(latents.shape, generator=generator), generator=generator)
                             for _ in range(len(t))]).to(self.device)
        return self.loss.at_timesteps(lambda x, r: model(x, r, **conditions), latents, t, generator, epsilon=epsilon)

    # -- previews ---------------------------------------------------------------------------
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        from inference.sampling import decode_stage_a, from_preset, run_sampler

        images = batch["images"].to(self.device).float()
        cond = self.get_conditions(batch, is_eval=True)
        uncond = self.get_conditions(batch, is_eval=True, is_unconditional=True)
        n, _, h, w = images.shape
        grids = {}
        for name, model in self.preview_models().items():
            x0 = run_sampler(model, self.gdf, cond, uncond, (n, 4, h // 4, w // 4), from_preset(self.preview_sampling),
                             generator=self.preview_generator, device=self.device, autocast=self.autocast())
            grids[name] = torch.cat([images.clamp(0, 1), decode_stage_a(self.stage_a, x0)])  # originals above
        return grids


def main() -> NoReturn:
    """The command line (console script ``cascade-train-b``): ``error: ...`` and exit 2 on a user error."""
    run_cli(StageBTrainer.main)


if __name__ == "__main__":
    main()
