"""The Stage C preview prompts: ``preview_prompts`` or a ``preview_prompts_file`` (kohya lines or a
YAML list, parsed by ``inference.prompts``, the parser ``inference.sample --prompts-file`` uses),
each with its own size, steps, CFG, seed and negative prompt.

The prompts are cycled to ``num_preview_images``; prompts with equal settings are sampled together.
A prompt's ``--d`` seed gives it a generator of its own (the same image at every preview, whatever
the other prompts); the others share the preview's generator, in order. Sizes are the decoded
image's pixels (``--w 1024`` = a 32-wide latent, as the training images'); every image of a grid
is resized to the first prompt's size (a grid holds one size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from core.config import doc
from core.errors import UserError

__all__ = ["PreviewPromptsConfig", "preview_specs", "spec_groups"]


@dataclass
class PreviewPromptsConfig:
    """The prompt file of the Stage C previews."""

    preview_prompts_file: Optional[str] = doc(
        None, "Prompt file of the previews, replacing preview_prompts: one prompt per line with kohya options "
              "(--w width, --h height, --s steps, --l CFG, --d seed, --n negative prompt; '#' comments) or a YAML list "
              "of prompts / {prompt, negative, width, height, steps, cfg, seed} mappings. The same format as "
              "`python3 -m inference.sample --prompts-file` (inference/prompts.py).")

    def validate_preview_prompts(self) -> None:
        path = self.preview_prompts_file
        if path is None:
            return
        if getattr(self, "cache_path", None):
            raise UserError("config key 'preview_prompts_file' does not combine with 'cache_path' (a cached run has no "
                            "text encoder: its previews use the cached captions); remove one of them")
        import os

        if getattr(self, "validate_only", False) and not os.path.exists(path):
            return
        try:
            from inference.prompts import read_prompt_file

            read_prompt_file(path)
        except UserError as exc:
            raise UserError(f"config key 'preview_prompts_file': {exc}") from None


def preview_specs(cfg: Any) -> list:
    """``num_preview_images`` PromptSpecs: the file's (or ``preview_prompts``) cycled."""
    from inference.prompts import PromptSpec, read_prompt_file

    if getattr(cfg, "preview_prompts_file", None):
        specs = read_prompt_file(cfg.preview_prompts_file)
    else:
        specs = [PromptSpec(p) for p in cfg.preview_prompts]
    return [specs[i % len(specs)] for i in range(cfg.num_preview_images)]


def spec_groups(specs: list) -> list[list[int]]:
    """Indices of the specs sampled together (equal settings), in first-appearance order."""
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(spec.settings(), []).append(i)
    return list(groups.values())
