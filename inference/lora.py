"""Adapter files at inference: read any supported layout and kind and MERGE them into the weights.

The layouts (ours, official positional, ComfyUI, kohya, OneTrainer, diffusers/PEFT:
``modules.adapters.layouts``) and kinds (LoRA, DoRA, LoKr, LoHa: ``modules.adapters``) are read by
``modules.lora_formats`` -- the same code the trainer writes them with -- and trained tokens are
replayed by ``modules.lora_tokens``; the official positional targets of a LIVE model come from
``modules.lora.lora_targets``. This module adds what inference needs on top: merging with a
strength that can be changed later (``W + strength * (W' - W)``, ``W'`` the kind's adapted weight,
as ComfyUI applies strength). Every record is checked against its weight before anything is
merged, so a file that does not fit (e.g. OneTrainer's depthwise-conv branch) changes nothing.
Merging makes sampling as fast as the base model, and strength 0 leaves every weight bit-identical.

The entry point for a sampler is :func:`apply_lora_file` (path, strength).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from inference.errors import UserError
from modules.lora import lora_targets
from modules.lora_formats import LoraFormatError, check_fits, detect_layout, read_entries, read_tokens

OFFICIAL_FILTERS = (".attn",)


@dataclass
class LoraWeights:
    """An adapter file in normalised form: ``modules.adapters.AdapterEntry`` records + trained tokens."""

    layout: str
    entries: list = field(default_factory=list)
    token_indices: Optional[torch.Tensor] = None
    token_deltas: Optional[torch.Tensor] = None


def read_lora(state_dict: dict[str, torch.Tensor], model: nn.Module,
              filters: Optional[Sequence[str]] = None, rank: Optional[int] = None,
              source: str = "LoRA file") -> LoraWeights:
    """Normalise a LoRA state dict for ``model`` (the generator it was trained on).

    ``filters`` (config ``module_filters``, default the official ``['.attn']``) and ``rank``
    only matter for the official positional layout, whose keys do not name their targets.
    """
    try:
        layout = detect_layout(state_dict, source)
        targets = None
        if layout == "official":
            try:
                targets = lora_targets(model, list(filters or OFFICIAL_FILTERS))
            except ValueError as exc:
                raise UserError(f"{source}: module_filters: {exc}") from None
        params = {n: tuple(p.shape) for n, p in model.named_parameters()}
        entries = read_entries(state_dict, list(params), targets, source)
        known = [e for e in entries if e.target in params]  # an unknown target is reported by merge_lora
        check_fits(known, params, source)
        tokens = read_tokens(state_dict)
    except LoraFormatError as exc:  # inference raises one error type (inference.errors)
        raise UserError(str(exc)) from None
    if rank is not None and layout == "official":
        ranks = {e.rank for e in entries}
        if ranks != {rank}:
            raise UserError(f"{source}: LoRA rank is {sorted(ranks)} but the config says rank {rank}; "
                            f"fix 'rank'")
    lora = LoraWeights(layout, entries)
    if tokens is not None:
        lora.token_indices, lora.token_deltas = tokens
    return lora


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoraWeights, strength: float = 1.0,
               source: str = "LoRA file") -> int:
    """Add ``strength * alpha/rank * up @ down`` (a DoRA: ``strength * (W' - W)``) to every target
    weight (in float32, cast back to the weight's dtype); returns how many updates were merged."""
    from modules.lora_formats import LoraFormatError, merged_weight

    params = dict(model.named_parameters())
    for entry in lora.entries:
        weight = params.get(entry.target)
        if weight is None:
            raise UserError(f"{source}: LoRA target {entry.target} is not a parameter of this "
                            f"model (wrong model_version or a LoRA for another stage?)")
        try:
            weight.copy_(merged_weight(weight, entry, strength, source))
        except LoraFormatError as exc:
            raise UserError(str(exc)) from None
    return len(lora.entries)


class MergedLora:
    """A LoRA merged into a model, whose strength can change later without reloading.

    The original target weights (and trained token rows) are kept, so ``set_strength`` restores
    them before merging again: switching strengths is exact, and ``remove()`` gives back the
    untouched model.
    """

    def __init__(self, model: nn.Module, lora: LoraWeights, text_model: Any = None,
                 source: str = "LoRA file") -> None:
        self.model, self.lora, self.text_model, self.source = model, lora, text_model, source
        params = dict(model.named_parameters())
        self._backup = {e.target: params[e.target].detach().clone()
                        for e in lora.entries if e.target in params}
        self._token_backup = None
        if lora.token_deltas is not None and text_model is not None:
            weight = text_model.get_input_embeddings().weight
            if lora.token_indices.numel() and int(lora.token_indices.max()) < weight.size(0):
                self._token_backup = weight[lora.token_indices].detach().clone()
        self.strength = 0.0

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the weights the model had before the LoRA."""
        params = dict(self.model.named_parameters())
        for target, original in self._backup.items():
            params[target].copy_(original)
        if self._token_backup is not None:
            weight = self.text_model.get_input_embeddings().weight
            weight[self.lora.token_indices.to(weight.device)] = self._token_backup.to(weight.device)
        self.strength = 0.0

    def set_strength(self, strength: float) -> None:
        """Merge at ``strength`` (0 = the base model, bit for bit)."""
        from inference.tokens import apply_token_deltas

        self.remove()
        merge_lora(self.model, self.lora, strength, self.source)
        if self.lora.token_deltas is not None and self.text_model is not None:
            apply_token_deltas(self.text_model, self.lora.token_indices, self.lora.token_deltas,
                               strength, self.source)
        self.strength = float(strength)


def load_lora_file(path: str) -> dict[str, torch.Tensor]:
    """Read a LoRA file with the project's loader (clear error when missing)."""
    from modules.loading import read_state_dict

    return read_state_dict(path)


def apply_lora_file(model: nn.Module, path: str, strength: float = 1.0,
                    filters: Optional[Sequence[str]] = None, rank: Optional[int] = None,
                    text_model: Any = None) -> MergedLora:
    """Read ``path`` and merge it into ``model`` (and its token deltas into ``text_model``).

    Call :func:`inference.tokens.add_train_tokens` first when the LoRA trained new tokens.
    """
    lora = read_lora(load_lora_file(path), model, filters, rank, source=str(path))
    merged = MergedLora(model, lora, text_model, source=str(path))
    merged.set_strength(strength)
    return merged
