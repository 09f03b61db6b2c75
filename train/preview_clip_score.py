"""Prompt adherence of the previews: the CLIP score of each preview image against its prompt.

``CLIP score = 100 * max(cos(text_embeds, image_embeds), 0)`` (the usual definition, e.g.
torchmetrics'), with the projected embeddings of one CLIP model (text and vision towers that share
an embedding space) from a LOCAL folder, never downloaded: either a full Hugging Face CLIP folder
(``config.json`` with ``text_config`` and ``vision_config``, e.g. a saved
``openai/clip-vit-large-patch14``) or a folder with ``text/`` (tokenizer + text model) and
``vision/`` sub-folders (the layout ``tools/tiny_clip.py`` writes). Images are preprocessed as CLIP
expects (``modules.conditioning.clip_preprocess``); the prompt is tokenised to 77 tokens.

Each preview logs ``clip_score_<grid>`` (the mean over its images, e.g. ``clip_score_generator``,
``clip_score_generator_ema``, ``clip_score_generator_full``) to metrics.jsonl / wandb / TensorBoard
at the preview's update, as the validation loss is logged, and shows it on the progress line. The
CLIP model is loaded on the main rank only, at the first preview, in float32 on the training device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from core.config import doc
from core.errors import UserError

__all__ = ["PreviewClipScoreConfig", "ClipScorer", "clip_scores", "clip_model_folders"]


@dataclass
class PreviewClipScoreConfig:
    """Keys of the preview CLIP score (Stage C jobs)."""

    preview_clip_score: bool = doc(False, "Log the CLIP score (100 x cosine of the CLIP embeddings of image and prompt, "
                                          ">= 0) of every preview image against its prompt, per preview grid, as "
                                          "clip_score_<grid> (train/preview_clip_score.py).")
    preview_clip_model: Optional[str] = doc(None, "LOCAL folder of the CLIP model of preview_clip_score: a Hugging Face "
                                                  "CLIP folder (text and vision towers) or a folder with text/ and "
                                                  "vision/ sub-folders.")

    def validate_preview_clip_score(self) -> None:
        if not self.preview_clip_score:
            if self.preview_clip_model is not None:
                raise UserError("config key 'preview_clip_model' applies with preview_clip_score: true only; remove it")
            return
        if not self.preview_clip_model:
            raise UserError("config key 'preview_clip_score: true' needs 'preview_clip_model' (a local CLIP folder)")
        if getattr(self, "cache_path", None):
            raise UserError("config key 'preview_clip_score' does not combine with 'cache_path' (a cached run previews "
                            "the cached captions, without text); remove one of them")
        if not getattr(self, "validate_only", False) and not os.path.isdir(self.preview_clip_model):
            raise UserError(f"config key 'preview_clip_model': folder not found: {self.preview_clip_model} (a local "
                            f"CLIP folder; nothing is downloaded)")


def clip_model_folders(folder: str) -> tuple[str, str]:
    """``(text folder, vision folder)`` of a CLIP model folder (see the module docstring)."""
    root = Path(folder)
    if (root / "text").is_dir() and (root / "vision").is_dir():
        return str(root / "text"), str(root / "vision")
    return str(root), str(root)


def clip_scores(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Per pair: ``100 * max(cos, 0)`` of (N, D) text and image embeddings -> (N,)."""
    cos = torch.nn.functional.cosine_similarity(text_embeds.float(), image_embeds.float(), dim=-1)
    return 100.0 * cos.clamp_min(0.0)


class ClipScorer:
    """A frozen CLIP (text + vision towers) scoring images against prompts."""

    def __init__(self, folder: str, device: torch.device | str = "cpu") -> None:
        from modules.conditioning import load_clip_text, load_clip_vision, load_tokenizer

        text, vision = clip_model_folders(folder)
        try:
            self.tokenizer = load_tokenizer(text, local_files_only=True)
            self.text_model = load_clip_text(text, device=device, local_files_only=True)
            self.vision_model = load_clip_vision(vision, device=device, local_files_only=True)
        except UserError as exc:
            raise UserError(f"config key 'preview_clip_model': {exc}") from None
        t, v = self.text_model.config.projection_dim, self.vision_model.config.projection_dim
        if t != v:
            raise UserError(f"config key 'preview_clip_model': {folder}: the text ({t}) and vision ({v}) embeddings "
                            f"differ in width, so they are not one CLIP model")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP scores (N,) of (N, 3, H, W) [0, 1] images against their prompts."""
        from modules.conditioning import MAX_LENGTH, clip_preprocess

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        param = next(self.vision_model.parameters())
        pixels = clip_preprocess(images.float().clamp(0, 1), size=int(self.vision_model.config.image_size))
        image_embeds = self.vision_model(pixel_values=pixels.to(param.device, param.dtype)).image_embeds
        tokens = self.tokenizer(list(prompts), truncation=True, padding="max_length", max_length=MAX_LENGTH,
                                return_tensors="pt")
        device = next(self.text_model.parameters()).device
        text_embeds = self.text_model(input_ids=tokens["input_ids"].to(device),
                                      attention_mask=tokens["attention_mask"].to(device)).text_embeds
        return clip_scores(text_embeds, image_embeds)


def preview_clip_metrics(trainer: Any, grids: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{clip_score_<grid>: mean}`` of the sampled grids (main rank; loads the scorer once)."""
    prompts: Optional[list[str]] = getattr(trainer, "preview_prompt_list", None)
    if not trainer.cfg.preview_clip_score or not trainer.is_main or not prompts:
        return {}
    if getattr(trainer, "clip_scorer", None) is None:
        trainer.clip_scorer = ClipScorer(trainer.cfg.preview_clip_model, trainer.device)
    names = set(trainer.preview_models())
    out = {}
    for name, images in grids.items():
        if (name in names or name.removesuffix("_full") in names) and len(images) == len(prompts):
            out[f"clip_score_{name}"] = float(trainer.clip_scorer(images.to(trainer.device), prompts).mean())
    return out
