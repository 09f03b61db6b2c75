"""LoRA files: the four on-disk layouts, conversion between them, and merging into weights.

Layouts (``detect_layout``):

* ``named`` (what ``train_c_lora.py`` writes, ``lora.safetensors``): ``<target>.lora_down`` (r, in),
  ``<target>.lora_up`` (out, r), ``<target>.alpha`` (scalar) for every adapted parameter, e.g.
  ``down_blocks.0.2.attention.attn.in_proj_weight.lora_down``; trained tokens as
  ``embeddings.embeddings`` (n, width) / ``embeddings.indices`` (int64). Metadata describes the run.
  The delta of a target is ``up @ down * alpha / r``. A DoRA (``lora_type: dora``) adds
  ``<target>.dora_magnitude`` (out,) float32: the magnitude vector m of
  ``W' = m * (W + delta) / ||W + delta||_row`` (norm per output row; :func:`modules.lora.dora_weight`).
* ``official`` (docs/OFFICIAL.md, LoRA and ReToken): ``weights.{i}.lora_down/up`` positional, ``i`` = the i-th target
  of ``apply_lora(model, module_filters, rank)`` (official ``modules()`` order); scale 1/rank.
* ``comfyui`` (ComfyUI's Stable Cascade Stage C names): ``lora_prior_unet_<module with _>.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha``, scale ``alpha / rank``.
* ``kohya`` (kohya sd-scripts' Stable Cascade LoRA names): the same as ``comfyui`` with the prefix
  ``lora_unet_`` (``KOHYA_PREFIX``); same math, same q/k/v split. kohya adapts no depthwise convs
  (:func:`unloadable_targets`).

  Both tools' Stable Cascade code splits the packed attention ``in_proj_weight`` into ``to_q`` /
  ``to_k`` / ``to_v`` (rows in thirds), so a packed LoRA exports as three LoRAs sharing ``lora_down``.
  Importing re-packs them; a file whose q/k/v parts have DIFFERENT ``lora_down`` (trained on split projections) can be merged (``merge_entries`` adds each third) but
  not loaded as a trainable packed LoRA (that would need rank 3r): ``pack_qkv`` says so.
  A DoRA exports ``<stem>.dora_scale`` too, in the form ComfyUI's loader applies (see
  :func:`export_comfyui`; the key layout is documented in docs/LORA.md).

Everything here works on plain state dicts and tensors (also on the meta device), so tools need
no model weights; the only file access is :func:`read_lora_file`. Errors a user can fix raise
:class:`LoraFormatError`, a :class:`modules.loading.CheckpointError`, which the project's CLIs print
as one ``error:`` line.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from modules.loading import CheckpointError, read_state_dict
from modules.lora import dora_weight, lora_targets, row_norms

COMFY_PREFIX = "lora_prior_unet_"
KOHYA_PREFIX = "lora_unet_"
#: layout name -> key prefix of the layouts that name modules as ``<prefix><module with _>``.
PREFIXES = {"comfyui": COMFY_PREFIX, "kohya": KOHYA_PREFIX}
QKV = ("to_q", "to_k", "to_v")
FORMAT_NAME = "cascade-train-lora"
FORMAT_VERSION = "1"
_COMFY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")
DORA_MAGNITUDE = ".dora_magnitude"
# ComfyUI patches weights in float32 and adds this to the norm it divides dora_scale by.
_COMFY_EPS = torch.finfo(torch.float32).eps


class LoraFormatError(CheckpointError):
    """A LoRA file, or the settings that say how to read it (module_filters, model_version, rank),
    does not fit the model."""


@dataclass
class LoraEntry:
    """One low-rank update of parameter ``target``: ``up @ down * alpha / rank``.

    ``down`` is (r, in) or, from ComfyUI conv LoRAs, (r, in, kh, kw); ``up`` is (out, r) (trailing
    1-dims are dropped). ``block`` 0/1/2 marks a q/k/v third of a packed ``in_proj_weight``.

    A DoRA carries ``magnitude`` (out,) (our named layout: exact DoRA math) or, read from a
    ComfyUI file, ``dora_scale`` (applied with ComfyUI's own math); see :func:`merged_weight`."""

    target: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    block: Optional[int] = None
    magnitude: Optional[torch.Tensor] = None
    dora_scale: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, weight_shape: Sequence[int]) -> torch.Tensor:
        """The float32 update for a weight of ``weight_shape`` (a q/k/v block: its third)."""
        up, down = self.up.float().flatten(1), self.down.float()
        rows = weight_shape[0] // 3 if self.block is not None else weight_shape[0]
        shape = (rows, *weight_shape[1:])
        if down.dim() == 2:
            # Our LoRA on a conv weight is constant over the kernel positions (docs/OFFICIAL.md, LoRA and ReToken).
            d = (up @ down) * self.scale
            return d.view(d.shape + (1,) * (len(shape) - 2)).expand(shape)
        return ((up @ down.flatten(1)) * self.scale).view(shape)


# ----------------------------------------------------------------------------------------------
# Layout detection and reading
# ----------------------------------------------------------------------------------------------
def detect_layout(sd: Mapping[str, torch.Tensor], source: str = "LoRA file") -> str:
    """``comfyui``, ``kohya``, ``official``, ``named`` or ``tokens`` (token deltas only)."""
    keys = list(sd)
    found = [layout for layout, prefix in PREFIXES.items() if any(k.startswith(prefix) for k in keys)]
    if len(found) > 1:
        raise LoraFormatError(f"{source}: mixes {COMFY_PREFIX}* and {KOHYA_PREFIX}* keys; export it again in one layout")
    if found:
        return found[0]
    if any(re.fullmatch(r"weights\.\d+\.lora_(down|up)", k) for k in keys):
        return "official"
    if any(k.endswith((".lora_down", ".lora_up")) for k in keys):
        return "named"
    if "embeddings.embeddings" in sd:
        return "tokens"
    raise LoraFormatError(f"{source}: no LoRA keys found (expected <module>.lora_down, weights.N.lora_down "
                          f"{COMFY_PREFIX}*.lora_down.weight or {KOHYA_PREFIX}*.lora_down.weight); is this a LoRA file?")


def read_tokens(sd: Mapping[str, torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices int64 (n,), deltas (n, width))`` of trained token embeddings, or None."""
    if "embeddings.embeddings" not in sd:
        return None
    if "embeddings.indices" not in sd:
        raise LoraFormatError("LoRA file has embeddings.embeddings but no embeddings.indices")
    return sd["embeddings.indices"].long(), sd["embeddings.embeddings"]


def _read_named(sd: Mapping[str, torch.Tensor], source: str) -> list[LoraEntry]:
    out = []
    for key in sd:
        if key.endswith(DORA_MAGNITUDE) and key[: -len(DORA_MAGNITUDE)] + ".lora_down" not in sd:
            raise LoraFormatError(f"{source}: {key} has no matching {key[: -len(DORA_MAGNITUDE)]}.lora_down")
        if not key.endswith(".lora_down"):
            continue
        target = key[: -len(".lora_down")]
        if target + ".lora_up" not in sd:
            raise LoraFormatError(f"{source}: {key} has no matching {target}.lora_up")
        alpha = float(sd[target + ".alpha"]) if target + ".alpha" in sd else 1.0
        out.append(LoraEntry(target, sd[key], sd[target + ".lora_up"], alpha,
                             magnitude=sd.get(target + DORA_MAGNITUDE)))
    return out


def _read_official(sd: Mapping[str, torch.Tensor], targets: Optional[Sequence[str]], source: str) -> list[LoraEntry]:
    count = len({k.split(".")[1] for k in sd if re.fullmatch(r"weights\.\d+\.lora_(down|up)", k)})
    if targets is None:
        raise LoraFormatError(f"{source}: official positional layout needs module_filters and model_version "
                              f"to know which module weights.N adapts")
    if count != len(targets):
        raise LoraFormatError(f"{source}: holds {count} positional LoRAs (weights.N) but module_filters select "
                              f"{len(targets)} modules in this model; set module_filters/model_version as in training")
    out = []
    for i, target in enumerate(targets):
        down, up = sd.get(f"weights.{i}.lora_down"), sd.get(f"weights.{i}.lora_up")
        if down is None or up is None:
            raise LoraFormatError(f"{source}: weights.{i}.lora_down or weights.{i}.lora_up is missing")
        out.append(LoraEntry(target, down, up, 1.0))  # official scale 1/rank
    return out


def comfy_stem_table(param_names: Iterable[str], prefix: str = COMFY_PREFIX) -> dict[str, tuple[str, Optional[int]]]:
    """ComfyUI (or, with ``prefix=KOHYA_PREFIX``, kohya) LoRA stem -> (our parameter name, q/k/v
    block or None) for adaptable parameters (the inverse of :func:`comfyui_key_stems`)."""
    table: dict[str, tuple[str, Optional[int]]] = {}
    for name in param_names:
        if not name.endswith((".weight", ".in_proj_weight")):
            continue
        stems = comfyui_key_stems([name], prefix)
        for block, stem in enumerate(stems):
            table[stem] = (name, block if len(stems) == len(QKV) else None)
    return table


def _read_comfy(sd: Mapping[str, torch.Tensor], param_names: Iterable[str], source: str,
                prefix: str = COMFY_PREFIX) -> list[LoraEntry]:
    stems: dict[str, None] = {}
    for key in sd:
        for suffix in _COMFY_SUFFIXES:
            if key.endswith(suffix):
                stems.setdefault(key[: -len(suffix)], None)
                break
    table = comfy_stem_table(param_names, prefix)
    unknown = [s for s in stems if s not in table]
    if unknown:
        tool = "kohya" if prefix == KOHYA_PREFIX else "ComfyUI"
        raise LoraFormatError(f"{source}: {len(unknown)} {tool} LoRA names match no Stage C module, e.g. "
                              f"{unknown[0]} (text-encoder LoRAs are not supported; wrong stage or model_version?)")
    out = []
    for stem in stems:
        down, up = sd.get(stem + ".lora_down.weight"), sd.get(stem + ".lora_up.weight")
        if down is None or up is None:
            raise LoraFormatError(f"{source}: {stem} lacks lora_down.weight or lora_up.weight")
        if down.dim() == 4 and down.shape[-2:] == (1, 1):
            down = down.flatten(1)
        alpha = float(sd[stem + ".alpha"]) if stem + ".alpha" in sd else float(down.shape[0])
        target, block = table[stem]
        out.append(LoraEntry(target, down, up.flatten(1), alpha, block, dora_scale=sd.get(stem + ".dora_scale")))
    return out


def read_entries(sd: Mapping[str, torch.Tensor], param_names: Iterable[str],
                 official_targets: Optional[Sequence[str]] = None, source: str = "LoRA file") -> list[LoraEntry]:
    """All LoRA updates in ``sd`` (any layout) for a model with parameters ``param_names``."""
    layout = detect_layout(sd, source)
    if layout in PREFIXES:
        entries = _read_comfy(sd, param_names, source, PREFIXES[layout])
    elif layout == "official":
        entries = _read_official(sd, official_targets, source)
    elif layout == "named":
        entries = _read_named({k: v for k, v in sd.items() if not k.startswith("embeddings.")}, source)
    else:
        entries = []
    check_entries(entries, source)
    return entries


def check_entries(entries: Sequence[LoraEntry], source: str = "LoRA file") -> None:
    """LoraFormatError naming the file and the module when an entry is inconsistent in itself:
    ``lora_up`` and ``lora_down`` of different ranks (a damaged or hand-edited file; no ``rank`` key
    of a run can fit it) or a non-finite ``alpha``."""
    for e in entries:
        up_rank = e.up.shape[1] if e.up.dim() >= 2 else None
        if up_rank != e.rank:
            raise LoraFormatError(f"{source}: {e.target}: lora_up {tuple(e.up.shape)} has rank {up_rank} but "
                                  f"lora_down {tuple(e.down.shape)} has rank {e.rank}: the file is inconsistent "
                                  f"(damaged or edited); re-export it from its training run")
        if not math.isfinite(float(e.alpha)):
            raise LoraFormatError(f"{source}: {e.target}: alpha is {float(e.alpha)}; the file is damaged")


def _one_rank(entries: Sequence[LoraEntry], source: str) -> None:
    """A run trains one ``rank``: a file whose modules have different ranks cannot be loaded into it
    (each module would ask for another rank); say so instead of naming one module's rank."""
    ranks: dict[int, str] = {}
    for e in entries:
        ranks.setdefault(e.rank, e.target)
    if len(ranks) > 1:
        which = ", ".join(f"rank {r} at {t}" for r, t in sorted(ranks.items()))
        raise LoraFormatError(f"{source}: the file mixes LoRA ranks ({which}); a run trains one rank for every "
                              f"module, so it cannot continue from this file: merge it into the weights with "
                              f"tools/lora_merge.py or sample with it")


def pack_qkv(entries: Sequence[LoraEntry], source: str = "LoRA file") -> list[LoraEntry]:
    """Re-pack ComfyUI ``to_q``/``to_k``/``to_v`` thirds into one ``in_proj_weight`` LoRA.

    They must share ``lora_down`` (what ``export_comfyui`` writes); differing alphas are folded
    into the ``up`` rows. Raises LoraFormatError for thirds with different ``lora_down`` or a missing third.
    """
    plain = [e for e in entries if e.block is None]
    dora = next((e for e in entries if e.block is not None and e.dora_scale is not None), None)
    if dora is not None:
        # ComfyUI's dora_scale is tied to its own normalisation (and the base weight), not to our
        # trainable magnitude: such a file can be merged/sampled, not resumed from.
        raise LoraFormatError(f"{source}: {dora.target} is a ComfyUI DoRA (dora_scale); it cannot be loaded as a "
                              f"trainable LoRA; merge it (tools/lora_merge.py) or sample with it, or resume from "
                              f"the run's lora.safetensors")
    groups: dict[str, dict[int, LoraEntry]] = {}
    for e in entries:
        if e.block is not None:
            groups.setdefault(e.target, {})[e.block] = e
    for target, parts in groups.items():
        if sorted(parts) != [0, 1, 2]:
            have = [QKV[b] for b in sorted(parts)]
            raise LoraFormatError(f"{source}: {target} has LoRAs only for {have}; a packed attention LoRA needs "
                                  f"to_q, to_k and to_v (merge it with tools/lora_merge.py instead)")
        q = parts[0]
        for b in (1, 2):
            if parts[b].down.shape != q.down.shape or not torch.equal(parts[b].down, q.down):
                raise LoraFormatError(f"{source}: {target}: to_q/to_k/to_v have different lora_down, so they cannot "
                                      f"be one packed rank-{q.rank} LoRA; merge the file into the weights with "
                                      f"tools/lora_merge.py (or sample with it) instead of resuming from it")
        ups = [parts[b].up.float() * (parts[b].alpha / q.alpha) for b in range(3)]
        plain.append(LoraEntry(target, q.down, torch.cat(ups).to(q.up.dtype), q.alpha))
    return plain


# ----------------------------------------------------------------------------------------------
# Building files
# ----------------------------------------------------------------------------------------------
def named_state_dict(loras: Sequence[tuple[str, Any]], alpha: float,
                     token_indices: Optional[torch.Tensor] = None,
                     token_deltas: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The ``named`` layout from ``apply_lora``'s ``[(target, LoRA)]`` (detached CPU copies).

    The LoRA parameters must be plain tensors (a sharded DTensor is gathered by the caller)."""
    sd: dict[str, torch.Tensor] = {}
    if token_deltas is not None:
        sd["embeddings.embeddings"] = token_deltas.detach().float().cpu().clone()
        sd["embeddings.indices"] = token_indices.detach().long().cpu().clone()
    for target, lora in loras:
        sd[f"{target}.lora_down"] = _copy(lora.lora_down)
        sd[f"{target}.lora_up"] = _copy(lora.lora_up)
        sd[f"{target}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        if getattr(lora, "magnitude", None) is not None:  # a DoRA
            sd[f"{target}{DORA_MAGNITUDE}"] = _copy(lora.magnitude)
    return sd


def _copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.clone() if t.is_meta else t.cpu().clone()  # meta: export names without weights


def official_state_dict(named: Mapping[str, torch.Tensor], targets_in_order: Sequence[str]) -> dict[str, torch.Tensor]:
    """The official positional layout. The official loader scales by 1/rank, so an ``alpha`` other
    than 1 is folded into ``lora_up``. It cannot hold a DoRA (LoraFormatError)."""
    dora = next((k for k in named if k.endswith(DORA_MAGNITUDE)), None)
    if dora is not None:
        raise LoraFormatError(f"the official positional layout has no DoRA magnitude ({dora}); "
                              f"use the named file or the ComfyUI export")
    sd: dict[str, torch.Tensor] = {}
    if "embeddings.embeddings" in named:
        sd["embeddings.embeddings"] = named["embeddings.embeddings"]
        sd["embeddings.indices"] = named["embeddings.indices"]
    for i, target in enumerate(targets_in_order):
        alpha = float(named.get(f"{target}.alpha", torch.tensor(1.0)))
        up = named[f"{target}.lora_up"]
        sd[f"weights.{i}.lora_down"] = named[f"{target}.lora_down"]
        sd[f"weights.{i}.lora_up"] = up if alpha == 1.0 else (up.float() * alpha).to(up.dtype)
    return sd


def comfyui_key_stems(targets: Iterable[str], prefix: str = COMFY_PREFIX) -> list[str]:
    """The ComfyUI LoRA names (without ``.lora_down.weight`` etc.) an export of ``targets`` has;
    ``prefix=KOHYA_PREFIX`` gives kohya's names (the only difference between the two layouts)."""
    out = []
    for target in targets:
        if target.endswith(".in_proj_weight"):
            stem = prefix + target[: -len(".in_proj_weight")].replace(".", "_")
            out += [f"{stem}_{part}" for part in QKV]
        elif target.endswith(".weight"):
            out.append(prefix + target[: -len(".weight")].replace(".", "_"))
        else:
            raise LoraFormatError(f"cannot export a LoRA on {target} to ComfyUI/kohya (only .weight / in_proj_weight)")
    return out


def is_depthwise(shape: Sequence[int]) -> bool:
    """A grouped conv weight with one input channel per group and a real kernel (our ResBlock
    ``depthwise``): kohya does not adapt such layers and OneTrainer refuses LoRAs on them."""
    return len(shape) == 4 and shape[1] == 1 and tuple(shape[2:]) != (1, 1)


#: the tools that cannot load a LoRA on a depthwise conv, per export layout.
DEPTHWISE_UNLOADABLE = {"comfyui": ("OneTrainer",), "kohya": ("kohya", "OneTrainer")}


def unloadable_targets(targets: Iterable[str], param_shapes: Mapping[str, Sequence[int]],
                       layout: str) -> dict[str, list[str]]:
    """``{tool: [targets it cannot load]}`` for an export of ``targets`` in ``layout`` (empty when
    every tool that reads the layout loads every target). Callers warn with the names."""
    depthwise = [t for t in targets if is_depthwise(param_shapes.get(t, ()))]
    if not depthwise:
        return {}
    return {tool: depthwise for tool in DEPTHWISE_UNLOADABLE.get(layout, ())}


def export_kohya(entries: Sequence[LoraEntry], param_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                 dtype: Optional[torch.dtype] = None,
                 base_weights: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """kohya's ``lora_unet_`` keys for ``entries``: :func:`export_comfyui` with kohya's prefix."""
    return export_comfyui(entries, param_shapes, dtype, base_weights, prefix=KOHYA_PREFIX)


def comfy_dora_scale(e: LoraEntry, base_weight: torch.Tensor) -> torch.Tensor:
    """The ComfyUI ``dora_scale`` (out, 1[, 1, 1]) float32 that makes ComfyUI's loader produce
    exactly our DoRA weight ``m * V / ||V||_row`` (``V = W + delta``) from ``base_weight`` W.

    ComfyUI (comfy/weight_adapter/base.py ``weight_decompose``) treats a ``dora_scale`` whose
    dim 0 equals the weight's as per-output-row, and computes ``(W + delta) * dora_scale /
    (||W||_row + eps)``: it divides by the BASE weight's row norm, not by ``||W + delta||``. So
    we write ``m * (||W||_row + eps) / ||V||_row``, which ties the file to the base it was
    trained on (as a DoRA's magnitude is anyway)."""
    if e.magnitude is None:
        raise LoraFormatError(f"comfy_dora_scale: {e.target} is not a DoRA")
    shape = tuple(base_weight.shape)
    try:
        adapted = base_weight.float() + e.delta(shape)
    except RuntimeError:
        raise LoraFormatError(f"LoRA for {e.target} ({tuple(e.up.shape)} @ {tuple(e.down.shape)}) does not fit "
                              f"the base weight {shape}") from None
    if tuple(e.magnitude.shape) != shape[:1]:
        raise LoraFormatError(f"DoRA magnitude of {e.target} has shape {tuple(e.magnitude.shape)}, "
                              f"the weight {shape} needs ({shape[0]},)")
    # the same zero-row guard as modules.lora.dora_weight
    v_norm = row_norms(adapted).clamp_min(torch.finfo(torch.float32).tiny)
    scale = e.magnitude.float() * (row_norms(base_weight) + _COMFY_EPS) / v_norm
    return scale.view((-1,) + (1,) * (len(shape) - 1))


def export_comfyui(entries: Sequence[LoraEntry], param_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                   dtype: Optional[torch.dtype] = None,
                   base_weights: Optional[Mapping[str, torch.Tensor]] = None,
                   prefix: str = COMFY_PREFIX) -> dict[str, torch.Tensor]:
    """ComfyUI keys (kohya's with ``prefix=KOHYA_PREFIX``) for ``entries`` (packed ``in_proj`` split
    into q/k/v sharing ``lora_down``).

    ComfyUI scales by ``alpha / rank`` like we do, so ``alpha`` is written unchanged. A LoRA on a
    conv weight (constant over the kernel, docs/OFFICIAL.md) is written as ``lora_down`` repeated
    over the kernel positions and ``lora_up`` (out, r, 1, 1): ComfyUI's ``up.flatten(1) @
    down.flatten(1)`` then gives exactly the same update. ``param_shapes`` is needed for convs.
    A DoRA entry also gets ``<stem>.dora_scale`` (float32, each q/k/v third its rows), computed
    from its base weight in ``base_weights`` (:func:`comfy_dora_scale`).
    """
    sd: dict[str, torch.Tensor] = {}

    def put(stem: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
            scale: Optional[torch.Tensor] = None) -> None:
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        sd[f"{stem}.lora_down.weight"] = cast(down).contiguous()
        sd[f"{stem}.lora_up.weight"] = cast(up).contiguous()
        sd[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32, device=down.device)
        if scale is not None:  # kept float32: ComfyUI uses it as a per-row multiplier of the weight
            sd[f"{stem}.dora_scale"] = scale.float().contiguous()

    for e in entries:
        if e.block is not None:
            raise LoraFormatError(f"export_comfyui: {e.target} is a q/k/v block; pack it first")
        stems = comfyui_key_stems([e.target], prefix)
        down, up = e.down, e.up
        scale = e.dora_scale
        if e.magnitude is not None:
            base = (base_weights or {}).get(e.target)
            if base is None:
                raise LoraFormatError(f"export_comfyui: {e.target} is a DoRA; its ComfyUI dora_scale needs the base "
                                      f"weight it was trained on (pass the base Stage C checkpoint)")
            scale = comfy_dora_scale(e, base)
        shape = (param_shapes or {}).get(e.target)
        if shape is not None and len(shape) > 2 and down.dim() == 2:
            kernel = tuple(shape[2:])
            down = down.reshape(*down.shape, *(1,) * len(kernel)).expand(*down.shape, *kernel)
            up = up.reshape(*up.shape, *(1,) * len(kernel))
        if len(stems) == 3:
            c = up.shape[0] // 3
            for i, stem in enumerate(stems):
                third = None if scale is None else scale[i * c:(i + 1) * c].clone()
                put(stem, down.clone(), up[i * c:(i + 1) * c].clone(), e.alpha, third)
        else:
            put(stems[0], down, up, e.alpha, scale)
    return sd


def token_embedding_file(vectors: torch.Tensor, tokens: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A textual-inversion style embedding (``clip_g`` (n, width): the FINAL embedding rows of the
    trained tokens, base row + trained delta) and its metadata (the token strings, in order)."""
    return ({"clip_g": vectors.detach().float().cpu().contiguous()},
            {"tokens": json.dumps(list(tokens)), "format": "cascade-train-token-embeddings"})


# ----------------------------------------------------------------------------------------------
# Loading into trainable LoRAs, and merging
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def load_into_loras(loras: Sequence[tuple[str, Any]], entries: Sequence[LoraEntry], alpha: float,
                    source: str = "LoRA file") -> None:
    """Copy ``entries`` into the trainable ``[(target, LoRA)]`` of a run with scale ``alpha/rank``.

    Strict: every LoRA of the run needs an entry with the same rank and shapes, and every entry a
    LoRA. A different alpha in the file is folded into ``lora_up`` so the update is unchanged.
    """
    entries = pack_qkv(entries, source)
    by_target = {e.target: e for e in entries}
    ours = {t for t, _ in loras}
    missing = [t for t, _ in loras if t not in by_target]
    extra = [t for t in by_target if t not in ours]
    if missing or extra:
        raise LoraFormatError(f"{source}: covers {len(by_target)} modules, the run adapts {len(ours)} "
                              f"(missing e.g. {missing[:2]}, not adapted here e.g. {extra[:2]}); "
                              f"set module_filters as the LoRA was trained")
    _one_rank(entries, source)
    for target, lora in loras:
        e = by_target[target]
        ours_dora = getattr(lora, "magnitude", None) is not None
        if ours_dora != (e.magnitude is not None) or e.dora_scale is not None:
            what = "a DoRA" if e.magnitude is not None or e.dora_scale is not None else "a plain LoRA"
            raise LoraFormatError(f"{source}: {target} is {what} but this run trains "
                                  f"{'a DoRA' if ours_dora else 'a plain LoRA'}; set lora_type as the file was trained")
        down = e.down
        if down.dim() == 4:
            if not torch.equal(down, down[..., :1, :1].expand_as(down)):
                raise LoraFormatError(f"{source}: {target}: the conv LoRA varies over the kernel; our LoRA is "
                                      f"kernel-constant, so it can only be merged (tools/lora_merge.py)")
            down = down[..., 0, 0]
        if tuple(down.shape) != tuple(lora.lora_down.shape) or tuple(e.up.shape) != tuple(lora.lora_up.shape):
            raise LoraFormatError(f"{source}: {target}: LoRA shapes {tuple(e.up.shape)} @ {tuple(down.shape)} "
                                  f"do not fit "
                                  f"{tuple(lora.lora_up.shape)} @ {tuple(lora.lora_down.shape)} (rank {lora.rank}); "
                                  f"set rank to {e.rank} or check model_version")
        if ours_dora and tuple(e.magnitude.shape) != tuple(lora.magnitude.shape):
            raise LoraFormatError(f"{source}: {target}: DoRA magnitude shape {tuple(e.magnitude.shape)} does not fit "
                                  f"{tuple(lora.magnitude.shape)} (LoRA for another model_version?)")
        lora.lora_down.copy_(down.to(lora.lora_down.dtype))
        lora.lora_up.copy_((e.up.float() * (e.alpha / float(alpha))).to(lora.lora_up.dtype))
        if ours_dora:
            lora.magnitude.copy_(e.magnitude.to(lora.magnitude.dtype))


def _comfy_decompose(base: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, source: str,
                     target: str) -> torch.Tensor:
    """ComfyUI's DoRA weight for a ComfyUI-layout ``dora_scale`` (comfy/weight_adapter/base.py
    ``weight_decompose``, float32): ``(W + delta) * dora_scale / (norm + eps)``, the norm being
    the BASE weight's per output row when ``dora_scale``'s dim 0 is the weight's (out), else the
    adapted weight's per input column (the older LyCORIS form, dora_scale (1, in, ...))."""
    calc = base + delta
    if dora_scale.shape[0] == calc.shape[0]:
        norm = row_norms(base).view((-1,) + (1,) * (calc.dim() - 1))
    else:
        norm = calc.transpose(0, 1).flatten(1).norm(dim=1).view((1, -1) + (1,) * (calc.dim() - 2))
    norm = norm + _COMFY_EPS
    scale = dora_scale.float()
    try:
        ok = torch.broadcast_shapes(scale.shape, norm.shape) == norm.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise LoraFormatError(f"{source}: dora_scale of {target} has shape {tuple(scale.shape)}, which does not fit "
                              f"a weight of shape {tuple(calc.shape)} (ComfyUI expects {tuple(norm.shape)})")
    return calc * (scale / norm)


@torch.no_grad()
def merged_weight(weight: torch.Tensor, e: LoraEntry, strength: float = 1.0, source: str = "LoRA file") -> torch.Tensor:
    """``weight`` plus ``strength`` times the entry's update (its third of a packed q/k/v weight
    when ``e.block`` is set), computed in float32 and cast back to the weight's dtype.

    A DoRA's update is ``W' - W`` with ``W'`` its whole decomposed weight (``e.magnitude``: our
    math, :func:`modules.lora.dora_weight`; ``e.dora_scale``: ComfyUI's), so ``strength`` blends
    ``W + strength * (W' - W)`` as ComfyUI does (1 gives ``W'`` exactly, 0 the base)."""
    if e.magnitude is not None or e.dora_scale is not None:
        return _merged_dora(weight, e, float(strength), source)
    try:
        d = e.delta(tuple(weight.shape)) * float(strength)
    except RuntimeError:
        raise LoraFormatError(f"{source}: LoRA for {e.target} ({tuple(e.up.shape)} @ {tuple(e.down.shape)}) "
                              f"does not fit the weight {tuple(weight.shape)} "
                              f"(LoRA for another model_version?)") from None
    merged = weight.float().clone()
    if e.block is None:
        merged += d.to(merged.device)
    else:
        rows = weight.shape[0] // 3
        merged[e.block * rows:(e.block + 1) * rows] += d.to(merged.device)
    return merged.to(weight.dtype)


def _merged_dora(weight: torch.Tensor, e: LoraEntry, strength: float, source: str) -> torch.Tensor:
    merged = weight.float().clone()
    rows = slice(None) if e.block is None else slice(e.block * (weight.shape[0] // 3),
                                                     (e.block + 1) * (weight.shape[0] // 3))
    base = merged[rows]
    try:
        delta = e.delta(tuple(weight.shape))
        if e.magnitude is not None:
            if tuple(e.magnitude.shape) != tuple(base.shape[:1]):
                raise RuntimeError
            new = dora_weight(base, delta, e.magnitude)
        else:
            new = _comfy_decompose(base, delta.to(base.device), e.dora_scale.to(base.device), source, e.target)
    except RuntimeError:
        raise LoraFormatError(f"{source}: DoRA for {e.target} ({tuple(e.up.shape)} @ {tuple(e.down.shape)}) "
                              f"does not fit the weight {tuple(weight.shape)} "
                              f"(LoRA for another model_version?)") from None
    merged[rows] = new.to(merged.device) if strength == 1.0 else base + strength * (new.to(merged.device) - base)
    return merged.to(weight.dtype)


@torch.no_grad()
def merge_entries(state_dict: dict[str, torch.Tensor], entries: Sequence[LoraEntry], strength: float = 1.0,
                  source: str = "LoRA file") -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with every update added (:func:`merged_weight`).

    The state dict uses official (plain) key names, so the target names are the keys."""
    out = dict(state_dict)
    for e in entries:
        w = out.get(e.target)
        if w is None:
            raise LoraFormatError(f"{source}: LoRA target {e.target} is not in the checkpoint (wrong model?)")
        out[e.target] = merged_weight(w, e, strength, source)
    return out


def entries_from_named(sd: Mapping[str, torch.Tensor]) -> list[LoraEntry]:
    """Entries of a ``named`` state dict (convenience for tools/tests)."""
    return _read_named({k: v for k, v in sd.items() if not k.startswith("embeddings.")}, "LoRA")


__all__ = ["LoraEntry", "LoraFormatError", "check_entries", "merged_weight", "read_lora_file", "metadata_list",
           "detect_layout", "read_tokens", "read_entries", "pack_qkv", "comfy_stem_table",
           "named_state_dict", "official_state_dict", "comfyui_key_stems", "export_comfyui", "export_kohya",
           "is_depthwise", "unloadable_targets", "KOHYA_PREFIX", "PREFIXES",
           "token_embedding_file", "load_into_loras", "merge_entries", "entries_from_named",
           "FORMAT_NAME", "FORMAT_VERSION", "COMFY_PREFIX", "stage_c_targets", "check_stage_c_version",
           "DORA_MAGNITUDE", "comfy_dora_scale"]


# ----------------------------------------------------------------------------------------------
# Model-derived facts (built on the meta device: no memory, no weights)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _stage_c_facts(model_version: str, filters: tuple[str, ...]) -> tuple[tuple[str, ...], tuple]:
    from modules.registry import build_model

    model = build_model("stage_c", model_version, device="meta")
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    if not filters:
        return (), shapes
    try:
        targets = tuple(lora_targets(model, list(filters)))
    except ValueError as exc:
        raise LoraFormatError(f"module_filters: {exc}") from None
    return targets, shapes


def stage_c_targets(model_version: str, filters: Sequence[str], rank: int = 1) -> tuple[list[str], dict[str, tuple]]:
    """``(LoRA targets in official order, {parameter name: shape})`` of Stage C ``model_version``
    for ``module_filters`` (the targets give ``weights.{i}`` its meaning; the rank does not matter)."""
    from modules.registry import MODEL_CONFIGS

    if model_version not in MODEL_CONFIGS["stage_c"]:
        raise LoraFormatError(f"unknown Stage C model_version '{model_version}' "
                              f"(known: {', '.join(MODEL_CONFIGS['stage_c'])})")
    targets, shapes = _stage_c_facts(model_version, tuple(filters))
    return list(targets), dict(shapes)


def check_stage_c_version(state_dict: Mapping[str, torch.Tensor], model_version: Optional[str] = None,
                          source: str = "checkpoint") -> str:
    """``model_version`` (or, if None, the registry version) that ``state_dict`` matches exactly;
    LoraFormatError otherwise. Each candidate costs one meta-device build, so pass the version if known."""
    from modules.registry import MODEL_CONFIGS

    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    for version in [model_version] if model_version else list(MODEL_CONFIGS["stage_c"]):
        if dict(_stage_c_facts(version, ())[1]) == have:
            return version
    what = f"Stage C {model_version}" if model_version else f"any Stage C version ({', '.join(MODEL_CONFIGS['stage_c'])})"
    raise LoraFormatError(f"{source} does not match {what}; is it a Stage C checkpoint in the official layout "
                          f"(and the right model_version)?")


def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, safetensors metadata)`` of a LoRA file (.safetensors, or .pt/.ckpt without metadata)."""
    sd = read_state_dict(path)
    meta: dict[str, str] = {}
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    return sd, meta


def metadata_list(meta: Mapping[str, str], key: str) -> Optional[list]:
    """A JSON list stored in LoRA metadata (None when absent or unreadable)."""
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError):
        return None
    return value if isinstance(value, list) else None
