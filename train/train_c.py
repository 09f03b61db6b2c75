"""Stage C (text-conditional prior) finetuning / training.

    python3 train/train_c.py configs/training/finetune_c_3b.yaml [--set lr=2e-5] [--dry-run]

What one step does (docs/OFFICIAL.md, Stage C conditions and Stage C step):
* conditions: CLIP text of the caption (dropped to "" for 5 % of the samples), pooled CLIP text, and
  the CLIP image embedding of the training image for 10 % of the samples (zeros otherwise);
* target latents: EfficientNet encoder of the ImageNet-normalised images (frozen);
* loss: per-sample MSE against the noise, times the GDF loss weight (P2, or AdaptiveLossWeight when
  ``adaptive_loss_weight: true``).
Previews: samples for the config's ``preview_prompts``, decoded with the Previewer (and through
Stage B and Stage A when both are configured), sampled by ``inference.sampling`` like inference.

LoRA and ControlNet jobs subclass :class:`StageCTrainer` and override its hooks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

import torch
from torch import nn

from core.config import doc
from core.errors import UserError, run_cli
from train.cascade import CascadeConfig, CascadeTrainer
from train.concepts import CONCEPT_REG_KEY, ConceptsConfig
from train.memory_specs import stage_c_spec
from train.preview_clip_score import PreviewClipScoreConfig
from train.preview_prompts import PreviewPromptsConfig
from train.regularization import (REG_KEY, RegularizationConfig, build_mixed_pipeline, regularization_count,
                                  regularized_loss)
from train.stage_c_conditions import condition_dropout


@dataclass
class StageCConfig(CascadeConfig, RegularizationConfig, ConceptsConfig, PreviewPromptsConfig, PreviewClipScoreConfig):
    """Keys of a Stage C job (all official keys; see docs/CONFIG.md)."""

    previewer_checkpoint_path: Optional[str] = doc(None, "Previewer weights; required by Stage C jobs (previews).")
    stage_b_checkpoint_path: Optional[str] = doc(None, "Stage B weights for full C->B->A preview decodes of Stage C jobs (optional; needs stage_a_checkpoint_path).")
    clip_image_model_name: str = doc("openai/clip-vit-large-patch14", "CLIP image encoder (Stage C conditions; Hugging Face name or local folder).")
    image_embed_prob: float = doc(0.1, "Probability of conditioning a sample on the CLIP image embedding of its own image (zeros otherwise).")
    cache_path: Optional[str] = doc(
        None, "Folder written by tools/cache_dataset.py: train from its cached EfficientNet latents and CLIP "
              "embeddings; the effnet and CLIP text/vision models are then never loaded. The cache shards go through "
              "the same data pipeline as images (per-epoch shuffle, rank/worker split, exact resume; seed, "
              "num_workers, shuffle_buffer and strict apply; webdataset_path, crops and filters are the cached "
              "ones); caption dropout uses the cached CLIP(''). None = encode the images every step.")

    def validate_run(self, world_size: Optional[int] = None) -> None:
        super().validate_run(world_size)
        if world_size is not None and self.training and self.regularization_webdataset_path is not None:
            # the share is of the per-rank micro-batch, known only with the launcher's world size
            regularization_count(self.regularization_share, self.per_rank_batch(world_size))

    def validate_stage_c(self) -> None:
        self.check_versions("stage_c", "Stage C")
        if self.precision == "fp16" or self.dtype == "float16":
            raise UserError("fp16 is not supported for Stage C (activations overflow); use precision: bf16 or fp32 "
                            "and dtype: bfloat16 or float32")
        if self.training:
            self.require("previewer_checkpoint_path", why="Stage C training")
            if not self.cache_path:  # a cached run never loads the EfficientNet
                self.require("effnet_checkpoint_path", why="Stage C training")
        if self.cache_path:
            self.check_folder("cache_path", "write it with python3 tools/cache_dataset.py")
        for key in ("effnet_checkpoint_path", "previewer_checkpoint_path", "generator_checkpoint_path",
                    "stage_b_checkpoint_path", "stage_a_checkpoint_path"):
            # a diffusers StableCascadeUNet folder is a generator checkpoint too (modules/diffusers_format.py)
            self.check_file(key, folder_ok=key == "generator_checkpoint_path")
        if self.cache_path and self.tag_options() is not None:
            raise UserError("config keys 'caption_tag_shuffle' / 'caption_tag_dropout' do not combine with 'cache_path': "
                            "the cache holds the CLIP embeddings of the captions as they were; remove one of them")
        if self.cache_path and self.validation_webdataset_path is not None:
            raise UserError("config key 'validation_webdataset_path' is not supported with cache_path (a cached run "
                            "loads no image encoders to encode the held-out images); remove one of them")
        self.check_fraction("image_embed_prob")


class StageCTrainer(CascadeTrainer):
    """Trains the Stage C generator; the hooks below are what LoRA/ControlNet jobs override."""

    Config = StageCConfig
    model_kind = "stage_c"
    description = "Finetune / train Stage C (text-conditional prior)."
    #: official training-preview sampling (docs/OFFICIAL.md, Official sampling settings)
    preview_sampling = "stage_c_preview"
    preview_decoder = "previewer"

    memory_spec = staticmethod(stage_c_spec)  # the dry run's per-rank memory estimate

    @classmethod
    def data_sources(cls, cfg: Any) -> dict[str, Any]:
        out = super().data_sources(cfg)
        if cfg.cache_path:  # the cache replaces the images (its folder is an input path)
            out.pop("webdataset_path")
        if cfg.regularization_webdataset_path is not None:
            out["regularization_webdataset_path"] = cfg.regularization_webdataset_path
        if cfg.concepts is not None:  # the concepts replace webdataset_path (train/concepts.py)
            from train.concepts import parse_concepts

            out.pop("webdataset_path", None)
            out.update({f"concepts[{i}].path": c.path for i, c in enumerate(parse_concepts(cfg.concepts))})
        return out

    # -- models ---------------------------------------------------------------------------
    def build_models(self) -> None:
        self.setup_loss()
        self.build_generator()  # first: a wrong checkpoint fails before the big loads
        self.build_frozen()

    def build_generator(self) -> None:
        """The trained network (LoRA / ControlNet jobs register a frozen Stage C instead)."""
        self.add_trained("generator", self.load_generator(), save_as="generator")

    def build_frozen(self) -> None:
        """Previewer, encoders (or the cache's CLIP('')), and the optional Stage B / A for previews."""
        from modules.conditioning import load_clip_text, load_clip_vision, load_tokenizer
        from modules.loading import load_detected, load_model

        cfg, dev = self.cfg, self.device
        self.add_frozen("previewer", load_detected("previewer", cfg.previewer_checkpoint_path, device=dev))
        self.tokenizer = self.uncond = self.effnet = self.text_model = self.image_model = None
        self.stage_b = self.stage_a = None
        if cfg.cache_path:  # the cache holds the encoders' outputs: never construct them (memory, time)
            from train.stage_c_cache import load_unconditional

            self.uncond = load_unconditional(cfg.cache_path)
        else:
            self.add_frozen("effnet", self.load_effnet())
            self.tokenizer = load_tokenizer(cfg.clip_text_model_name)
            self.add_frozen("text_model", load_clip_text(cfg.clip_text_model_name, dtype=self.frozen_dtype, device=dev),
                            quantize=True)  # base_dtype
            self.add_frozen("image_model", load_clip_vision(cfg.clip_image_model_name, dtype=self.frozen_dtype,
                                                            device=dev))
        if cfg.stage_b_checkpoint_path and cfg.stage_a_checkpoint_path:  # full C -> B -> A previews
            self.add_frozen("stage_b", self.load_stage_b(cfg.stage_b_checkpoint_path))
            self.add_frozen("stage_a", load_model("stage_a", "default", cfg.stage_a_checkpoint_path, device=dev),
                            cast=False)  # 20M parameters, decode only: float32

    def load_stage_b(self, path: str) -> nn.Module:
        """Stage B for preview decodes; its model_version is read from the file's layout."""
        from modules.loading import detect_model_version, load_model

        version = detect_model_version("stage_b", path)
        if version is None:
            raise UserError(f"config key 'stage_b_checkpoint_path': {path} is not a Stage B checkpoint "
                            f"(3B, 700M or tiny)")
        return load_model("stage_b", version, path, dtype=self.frozen_dtype, device=self.device)

    def build_pipeline(self, batch_size: int, state: Optional[dict]) -> Any:
        if self.cfg.concepts is not None:  # train/concepts.py
            from train.concepts import build_concept_pipeline

            return build_concept_pipeline(self.cfg, batch_size, self.dist.world_size, state,
                                          self.image_pipeline_options())
        if self.cfg.regularization_webdataset_path is not None:  # train/regularization.py
            return build_mixed_pipeline(self.cfg, batch_size, state, self.image_pipeline_options())
        if not self.cfg.cache_path:
            return super().build_pipeline(batch_size, state)
        from train.stage_c_cache import build_cache_pipeline, read_manifest

        cfg = self.cfg
        if cfg.masked_loss and not read_manifest(cfg.cache_path).get("masks"):
            raise UserError(f"config key 'masked_loss': the cache in {cfg.cache_path} holds no masks; write it again "
                            f"with masked_loss: true in the config of tools/cache_dataset.py")
        return build_cache_pipeline(cfg.cache_path, batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
                                    seed=cfg.seed, num_workers=cfg.num_workers, state=state,
                                    shuffle_buffer=cfg.shuffle_buffer, strict=cfg.strict)

    # -- conditions and latents -------------------------------------------------------------
    @property
    def clip_image_width(self) -> int:
        """Width of the CLIP image embedding the generator takes."""
        return int(self.unwrapped("generator").clip_img_mapper.in_features)

    def get_conditions(self, batch: dict, is_eval: bool = False, is_unconditional: bool = False,
                       eval_image_embeds: bool = False,
                       generators: Optional[list[torch.Generator]] = None) -> dict[str, Any]:
        """``clip_text``, ``clip_text_pooled``, ``clip_img`` (docs/OFFICIAL.md, Stage C conditions); training draws
        come from :func:`condition_dropout`."""
        from modules.conditioning import encode_images_clip, encode_text

        captions = list(batch["captions"])
        n = len(captions)
        use_img = [False] * n
        if is_unconditional:
            captions = [""] * n
        elif not is_eval:
            generators = generators if generators is not None else self.sample_generators(n)
            drop, use_img = condition_dropout(generators, self.cfg.text_dropout, self.cfg.image_embed_prob)
            captions = ["" if d else c for c, d in zip(captions, drop)]
        elif eval_image_embeds:
            use_img = [True] * n
        # frozen_dtype (bf16) encoder outputs -> the generator's input dtype (as the cache path gives)
        clip_text, clip_text_pooled = (t.to(self.model_dtype) for t in encode_text(self.tokenizer, self.text_model,
                                                                                    captions))
        c_img = self.image_model.config.projection_dim
        clip_img = torch.zeros(n, 1, c_img, device=self.device, dtype=clip_text.dtype)
        idx = [i for i, u in enumerate(use_img) if u]
        if idx:
            images = batch["images"][idx].to(self.device)
            clip_img[idx] = encode_images_clip(self.image_model, images).to(clip_img.dtype)
        return {"clip_text": clip_text, "clip_text_pooled": clip_text_pooled, "clip_img": clip_img}

    def cached_conditions(self, batch: dict, generators: list[torch.Generator]) -> dict[str, Any]:
        """The conditions of a cached training batch, drawn by :func:`condition_dropout` like
        :meth:`get_conditions`; a dropped caption gets the cached CLIP('')."""
        from train.stage_c_cache import cached_conditions

        return cached_conditions(batch, self.uncond, generators, self.cfg.text_dropout, self.cfg.image_embed_prob,
                                 c_img=self.clip_image_width, device=self.device, dtype=self.model_dtype)

    def conditions_and_latents(self, batch: dict, generators: list[torch.Generator]) -> tuple[dict, torch.Tensor]:
        """Training conditions and target latents of a batch: from the frozen encoders, or from the
        cache (a batch with ``latents``). Conditions first: their draws precede the diffusion draws."""
        if "latents" in batch:
            return self.cached_conditions(batch, generators), batch["latents"].to(self.device).float()
        conditions = self.get_conditions(batch, generators=generators)
        return conditions, self.encode_latents(batch["images"].to(self.device))

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Stage C latents of [0,1] images: the frozen EfficientNet's output."""
        return self.encode_effnet(images)

    # -- step -------------------------------------------------------------------------------
    def extra_model_inputs(self, batch: dict, conditions: dict) -> dict[str, Any]:
        """More generator inputs for a step (ControlNet: ``{'cnet': ...}``)."""
        return {}

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        n = len(batch["captions"]) + (len(batch[REG_KEY]["captions"]) if REG_KEY in batch else 0)
        generators = self.sample_generators(n)
        if REG_KEY in batch:
            return regularized_loss(self.part_loss, batch, generators, self.cfg.regularization_weight)
        if batch.get(CONCEPT_REG_KEY):  # a regularization concept's micro-batch (train/concepts.py)
            weight = torch.full((n,), float(self.cfg.regularization_weight))
            loss, per_sample = self.part_loss(batch, generators, sample_weight=weight)
            return loss, {"raw_loss": per_sample.mean(), "reg_raw_loss": per_sample.mean()}
        loss, per_sample = self.part_loss(batch, generators)
        return loss, {"raw_loss": per_sample.mean()}

    def part_loss(self, batch: dict, generators: list[torch.Generator],
                  sample_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, per-sample raw losses)`` of one batch, one generator per sample."""
        with torch.no_grad():
            conditions, latents = self.conditions_and_latents(batch, generators)
        conditions.update(self.extra_model_inputs(batch, conditions))
        return self.loss(lambda x, r: self.generator(x, r, **conditions), latents, generators,
                         sample_weight=sample_weight, pixel_weight=self.pixel_weights(batch, latents))

    # -- validation (core/validation.py) ----------------------------------------------------
    def validation_losses(self, sample: dict, t: torch.Tensor, generator: torch.Generator,
                          model: nn.Module) -> dict[str, torch.Tensor]:
        """One held-out sample at the times ``t``: eval conditions (caption kept, no image
        embedding: no dropout), ``model`` in place of the trained network."""
        from train.diffusion_loss import repeat_inputs

        conditions = self.get_conditions(sample, is_eval=True)
        latents = self.encode_latents(sample["images"].to(self.device))
        forward = self.validation_forward(model, sample, conditions, generator)
        if forward is None:
            inputs = repeat_inputs(conditions, len(t))
            forward = lambda x, r: model(x, r, **inputs)  # noqa: E731
        return self.loss.at_timesteps(forward, latents, t, generator)

    def validation_forward(self, model: nn.Module, sample: dict, conditions: dict,
                           generator: torch.Generator) -> Any:
        """``(x, r) -> prediction`` of a validation sample repeated over its timesteps, when the
        job's forward differs from ``model(x, r, **conditions)`` (ControlNet); None otherwise."""
        return None

    # -- previews ---------------------------------------------------------------------------
    def sample_latents(self, model: nn.Module, conditions: dict, unconditions: dict,
                       shape: tuple[int, ...], steps: Optional[int] = None, cfg: Optional[float] = None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A Stage C sample with the official preview settings (``steps`` / ``cfg`` replace theirs),
        through inference's sampler."""
        from inference.sampling import from_preset, run_sampler

        settings = from_preset(self.preview_sampling).replace(timesteps=steps, cfg=cfg)
        return run_sampler(model, self.gdf, conditions, unconditions, shape, settings,
                           generator=generator or self.preview_generator, device=self.device, autocast=self.autocast())

    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        if "latents" not in batch:
            return self.prompt_previews(batch)
        # cached run: no text encoder for the preview prompts; use the cached captions
        cond, uncond = self.cached_preview_conditions(batch)
        reference = batch["latents"].to(self.device).float()
        n, (h, w) = len(reference), (reference.shape[-2] * 32, reference.shape[-1] * 32)
        shape = (n, 16, max(1, h // 32), max(1, w // 32))
        # What the Previewer makes of the real latents of the preview images: the best a sample can look.
        grids = {"reference": self.previewer(reference).float()}
        for name, model in self.preview_models().items():
            latents = self.sample_latents(model, cond, uncond, shape)
            grids[name] = self.previewer(latents).float().clamp(0, 1)
            if self.stage_b is not None:
                grids[f"{name}_full"] = self.decode_full(latents, cond["clip_text_pooled"],
                                                         uncond["clip_text_pooled"], (h, w))
        return grids

    def preview_metrics(self, grids: dict[str, torch.Tensor]) -> dict[str, float]:
        """CLIP scores of the sampled grids against their prompts (``preview_clip_score``)."""
        from train.preview_clip_score import preview_clip_metrics

        return preview_clip_metrics(self, grids)

    def prompt_previews(self, batch: dict) -> dict[str, torch.Tensor]:
        """Samples of the preview prompts (train/preview_prompts.py: per-prompt size, steps, CFG, seed,
        negative prompt); ``self.preview_prompt_list`` keeps the prompts in grid order (CLIP score)."""
        from train.preview_prompts import preview_specs, spec_groups

        if getattr(self, "_preview_specs", None) is None:  # read once: a file edited mid-run cannot break it
            self._preview_specs = preview_specs(self.cfg)
        specs = self._preview_specs
        self.preview_prompt_list = [s.prompt for s in specs]
        h, w = batch["images"].shape[-2:]
        grids = {"reference": self.previewer(self.encode_latents(batch["images"].to(self.device))).float()}
        for name, model in self.preview_models().items():
            parts: dict[str, list] = {}
            for idx in spec_groups(specs):
                spec = specs[idx[0]]
                hh, ww = spec.height or h, spec.width or w
                cond = self.get_conditions({"captions": [specs[i].prompt for i in idx]}, is_eval=True)
                uncond = self.get_conditions({"captions": [spec.negative or ""] * len(idx)}, is_eval=True)
                generator = None
                if spec.seed is not None:
                    generator = torch.Generator(self.preview_generator.device).manual_seed(spec.seed)
                latents = self.sample_latents(model, cond, uncond, (len(idx), 16, max(1, hh // 32), max(1, ww // 32)),
                                              steps=spec.steps, cfg=spec.cfg, generator=generator)
                parts.setdefault(name, []).append((idx, self.previewer(latents).float().clamp(0, 1)))
                if self.stage_b is not None:
                    full = self.decode_full(latents, cond["clip_text_pooled"], uncond["clip_text_pooled"], (hh, ww))
                    parts.setdefault(f"{name}_full", []).append((idx, full))
            for key, pieces in parts.items():
                grids[key] = _in_order(pieces, len(specs))
        return grids

    def cached_preview_conditions(self, batch: dict) -> tuple[dict, dict]:
        """Eval conditions (caption kept, no image embedding) and unconditions of cached samples."""
        n = len(batch["latents"])
        text, pooled = batch["clip_text"], batch["clip_text_pooled"]
        zeros = torch.zeros(n, 1, self.clip_image_width)
        cond = {"clip_text": text, "clip_text_pooled": pooled, "clip_img": zeros}
        uncond = {"clip_text": self.uncond["clip_text"].expand_as(text),
                  "clip_text_pooled": self.uncond["clip_text_pooled"].expand_as(pooled), "clip_img": zeros}
        to = dict(device=self.device, dtype=self.model_dtype)
        return {k: v.to(**to) for k, v in cond.items()}, {k: v.to(**to) for k, v in uncond.items()}

    def decode_full(self, latents_c: torch.Tensor, pooled: torch.Tensor, pooled_uncond: torch.Tensor,
                    size: tuple[int, int]) -> torch.Tensor:
        """Stage C latents -> Stage B sample (official inference settings) -> Stage A decode."""
        from gdf import presets
        from inference.sampling import STAGE_B_INFERENCE, decode_stage_a, run_sampler, stage_b_conditions

        cond, uncond = stage_b_conditions(pooled, pooled_uncond, latents_c)
        shape = (latents_c.shape[0], 4, size[0] // 4, size[1] // 4)
        x0 = run_sampler(self.stage_b, presets.stage_b(), cond, uncond, shape, STAGE_B_INFERENCE,
                         generator=self.preview_generator, device=self.device, autocast=self.autocast())
        return decode_stage_a(self.stage_a, x0)


def _in_order(pieces: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    """Images of the prompt groups back in prompt order, all resized to the first prompt's size."""
    import torch.nn.functional as F

    size = next(images for idx, images in pieces if 0 in idx).shape[-2:]
    out: list[Optional[torch.Tensor]] = [None] * n
    for idx, images in pieces:
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        for j, i in enumerate(idx):
            out[i] = images[j]
    return torch.stack(out)  # type: ignore[arg-type]


def main() -> NoReturn:
    """The command line (console script ``cascade-train-c``): ``error: ...`` and exit 2 on a user error."""
    run_cli(StageCTrainer.main)


if __name__ == "__main__":
    main()
