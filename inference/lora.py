"""LoRA files at inference: read any supported layout and MERGE the deltas into the weights.

Layouts (detected from the keys):

* official positional (``train_c_lora.py``): ``weights.{i}.lora_down`` / ``.lora_up`` for the LoRA
  targets in ``model.modules()`` order after ``apply_lora(model, module_filters, rank)`` (networks.md
  7.3), plus ``embeddings.embeddings`` / ``embeddings.indices`` (trained token deltas);
* named (``modules.lora.lora_state_dict_named``): ``<module>.<param>.lora_down`` / ``.lora_up``
  (optional ``.alpha``), e.g. ``down_blocks.0.2.attention.attn.in_proj_weight.lora_down``;
* ComfyUI / kohya: ``lora_prior_unet_<module_with_underscores>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (``lora_unet_`` for Stage B); an attention's packed in_proj may
  come as one ``..._attn_in_proj`` entry or as ``_to_q`` / ``_to_k`` / ``_to_v`` row blocks.

Merging (W += strength * scale * up @ down) instead of keeping parametrizations makes sampling as
fast as the base model, and strength 0 leaves every weight bit-identical.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from inference.errors import UserError

COMFY_PREFIXES = ("lora_prior_unet_", "lora_unet_")
_COMFY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_QKV = {"to_q": 0, "to_k": 1, "to_v": 2}
OFFICIAL_FILTERS = (".attn",)


@dataclass
class LoraDelta:
    """One low-rank update of ``target`` (a parameter name); ``block`` = q/k/v row third or None."""

    target: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    block: Optional[int] = None


@dataclass
class LoraWeights:
    """A LoRA file in normalised form."""

    layout: str
    deltas: list[LoraDelta] = field(default_factory=list)
    token_indices: Optional[torch.Tensor] = None
    token_deltas: Optional[torch.Tensor] = None


def _lora_target(module: nn.Module) -> Optional[str]:
    """The parameter ``apply_lora`` would wrap: ``weight``, else MHA's ``in_proj_weight``."""
    if isinstance(getattr(module, "weight", None), nn.Parameter):
        return "weight"
    if isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
        return "in_proj_weight"
    return None


def official_lora_targets(model: nn.Module, filters: Sequence[str]) -> list[str]:
    """Targets of the official positional layout, in the order ``weights.{i}`` uses.

    ``apply_lora`` registers each LoRA in its module's ``parametrizations`` child, which comes after
    the module's own children, so ``model.modules()`` reaches it after the module's whole subtree:
    sort by the end of that subtree, the deeper module first on ties (out_proj before in_proj).
    """
    names = [name for name, _ in model.named_modules()]
    position = {name: i for i, name in enumerate(names)}
    chosen = []
    for name, module in model.named_modules():
        attr = _lora_target(module)
        if attr is None or not any(f in name for f in filters):
            continue
        prefix = name + "." if name else ""
        end = max([position[name]] + [position[n] for n in names if n.startswith(prefix)])
        chosen.append((end, -position[name], f"{name}.{attr}" if name else attr))
    return [target for *_key, target in sorted(chosen)]


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """``official``, ``named`` or ``comfyui`` (``tokens`` when only token deltas are stored)."""
    keys = list(state_dict)
    if any(k.startswith(COMFY_PREFIXES) for k in keys):
        return "comfyui"
    if any(re.fullmatch(r"weights\.\d+\.lora_(down|up)", k) for k in keys):
        return "official"
    if any(k.endswith((".lora_down", ".lora_up")) for k in keys):
        return "named"
    if "embeddings.embeddings" in state_dict:
        return "tokens"
    raise UserError("LoRA file has no LoRA keys (expected weights.N.lora_down, "
                    "<module>.lora_down or lora_prior_unet_*.lora_down.weight)")


def _read_official(sd: dict, model: nn.Module, filters: Optional[Sequence[str]],
                   rank: Optional[int], source: str) -> list[LoraDelta]:
    count = len({k.split(".")[1] for k in sd if k.startswith("weights.")})
    targets = official_lora_targets(model, list(filters or OFFICIAL_FILTERS))
    if count != len(targets):
        raise UserError(f"{source}: holds {count} positional LoRA weights but module_filters "
                        f"{list(filters or OFFICIAL_FILTERS)} select {len(targets)} in this model; "
                        f"set module_filters as in training (or wrong model_version)")
    deltas = []
    for i, target in enumerate(targets):
        down, up = sd[f"weights.{i}.lora_down"], sd[f"weights.{i}.lora_up"]
        if rank is not None and down.size(0) != rank:
            raise UserError(f"{source}: LoRA rank is {down.size(0)} but the config says rank "
                            f"{rank}; fix 'rank'")
        deltas.append(LoraDelta(target, down, up, 1.0 / down.size(0)))
    return deltas


def _read_named(sd: dict, source: str) -> list[LoraDelta]:
    deltas = []
    for key in sd:
        if not key.endswith(".lora_down"):
            continue
        target = key[: -len(".lora_down")]
        up = sd.get(target + ".lora_up")
        if up is None:
            raise UserError(f"{source}: {key} has no matching {target}.lora_up")
        down = sd[key]
        alpha = float(sd[target + ".alpha"]) if target + ".alpha" in sd else 1.0
        deltas.append(LoraDelta(target, down, up, alpha / down.size(0)))
    return deltas


def _comfy_map(model: nn.Module, prefix: str) -> dict[str, tuple[str, Optional[int]]]:
    """ComfyUI key stem -> (our parameter name, q/k/v block or None)."""
    table: dict[str, tuple[str, Optional[int]]] = {}
    for name, module in model.named_modules():
        attr = _lora_target(module)
        if attr is None or not name:
            continue
        stem = prefix + name.replace(".", "_")
        if attr == "weight":
            table[stem] = (f"{name}.weight", None)
        else:
            table[stem] = (f"{name}.in_proj_weight", None)
            table[stem + "_in_proj"] = (f"{name}.in_proj_weight", None)
            for suffix, block in _QKV.items():
                table[f"{stem}_{suffix}"] = (f"{name}.in_proj_weight", block)
    return table


def _read_comfy(sd: dict, model: nn.Module, source: str) -> list[LoraDelta]:
    stems = {}
    for key in sd:
        for suffix in _COMFY_SUFFIXES:
            if key.endswith(suffix):
                stems.setdefault(key[: -len(suffix)], None)
                break
    prefix = next(p for p in COMFY_PREFIXES if any(s.startswith(p) for s in stems))
    table = _comfy_map(model, prefix)
    deltas, unknown = [], []
    for stem in stems:
        if not stem.startswith(prefix) or stem not in table:
            unknown.append(stem)
            continue
        down, up = sd.get(stem + ".lora_down.weight"), sd.get(stem + ".lora_up.weight")
        if down is None or up is None:
            raise UserError(f"{source}: {stem} lacks lora_down.weight or lora_up.weight")
        down, up = down.flatten(1), up.flatten(1)  # conv LoRAs store (r, in, 1, 1) / (out, r, 1, 1)
        alpha = float(sd[stem + ".alpha"]) if stem + ".alpha" in sd else float(down.size(0))
        target, block = table[stem]
        deltas.append(LoraDelta(target, down, up, alpha / down.size(0), block))
    if unknown:
        raise UserError(f"{source}: {len(unknown)} ComfyUI keys match no module of this model, "
                        f"e.g. {unknown[0]} (text-encoder LoRAs are not supported; wrong stage?)")
    return deltas


def read_lora(state_dict: dict[str, torch.Tensor], model: nn.Module,
              filters: Optional[Sequence[str]] = None, rank: Optional[int] = None,
              source: str = "LoRA file") -> LoraWeights:
    """Normalise a LoRA state dict for ``model`` (the generator it was trained on)."""
    layout = detect_layout(state_dict)
    if layout == "official":
        deltas = _read_official(state_dict, model, filters, rank, source)
    elif layout == "named":
        deltas = _read_named({k: v for k, v in state_dict.items()
                              if not k.startswith("embeddings.")}, source)
    elif layout == "comfyui":
        deltas = _read_comfy(state_dict, model, source)
    else:
        deltas = []
    lora = LoraWeights(layout, deltas)
    if "embeddings.embeddings" in state_dict:
        lora.token_deltas = state_dict["embeddings.embeddings"]
        lora.token_indices = state_dict["embeddings.indices"].long()
    return lora


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoraWeights, strength: float = 1.0,
               source: str = "LoRA file") -> int:
    """Add ``strength * scale * up @ down`` to every target weight; returns how many were merged."""
    params = dict(model.named_parameters())
    for delta in lora.deltas:
        weight = params.get(delta.target)
        if weight is None:
            raise UserError(f"{source}: LoRA target {delta.target} is not a parameter of this "
                            f"model (wrong model_version or a LoRA for another stage?)")
        rows = weight.size(0) // 3 if delta.block is not None else weight.size(0)
        out_dim, rank = delta.up.shape
        if delta.down.size(0) != rank or out_dim != rows or delta.down.size(1) != weight.size(1):
            raise UserError(f"{source}: LoRA for {delta.target} is {out_dim}x{rank} @ "
                            f"{tuple(delta.down.shape)} but the weight is {tuple(weight.shape)} "
                            f"(LoRA trained for another model_version?)")
        update = (delta.up.float() @ delta.down.float()) * (delta.scale * float(strength))
        update = update.view(update.shape + (1,) * (weight.dim() - 2)).to(weight.device, weight.dtype)
        if delta.block is None:
            weight.add_(update)
        else:
            weight[delta.block * rows:(delta.block + 1) * rows].add_(update)
    return len(lora.deltas)


def load_lora_file(path: str) -> dict[str, torch.Tensor]:
    """Read a LoRA file with the project's loader (clear error when missing)."""
    from modules.loading import read_state_dict

    return read_state_dict(path)


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
        self._backup = {d.target: params[d.target].detach().clone()
                        for d in lora.deltas if d.target in params}
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
