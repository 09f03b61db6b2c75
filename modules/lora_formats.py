"""Adapter files: reading every supported layout into generic records, writing them, merging.

The layouts and their names are :mod:`modules.adapters.layouts` (ours ``named``, ``official``
positional, ``comfyui``, ``comfyui_model`` (``diffusion_model.``), ``kohya``, ``onetrainer``,
``diffusers``); the kinds' math and tensor names are :mod:`modules.adapters`. A file entry is an
:class:`modules.adapters.AdapterEntry` (kind + tensors + alpha + q/k/v block), so nothing here
knows a kind's fields:

* reading (:func:`read_entries`): keys are split into stem + tensor name, stems looked up in the
  layouts' name table, tensors renamed to the kind's own names, the kind recognised by them;
* writing (:func:`export_layout`): each kind gives its tensors in the form the layout's tool reads
  (a DoRA as that tool's ``dora_scale``) or refuses with the reason; what a layout cannot hold is an
  error naming it, unless the caller opts into dropping it (then it is listed);
* merging (:func:`merged_weight`): the kind's adapted weight for a record, in float32. A record
  whose update does not have the weight's shape (e.g. OneTrainer's depthwise-conv LoRA, a full conv
  to rank r and a 1-channel conv added to every channel: an extra branch, not a change of the
  depthwise weight) is refused with one line naming the key and the reason, never reshaped.

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
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from modules.adapters import AdapterEntry, AdapterError, kind, kind_of_tensors, kinds
from modules.adapters import layouts as L
from modules.adapters.dora import comfy_dora_scale as _comfy_dora_scale
from modules.loading import CheckpointError, read_state_dict
from modules.lora import Adapter, lora_targets

COMFY_PREFIX = L.UNDERSCORE_PREFIXES["comfyui"]
KOHYA_PREFIX = L.UNDERSCORE_PREFIXES["kohya"]
#: layout name -> key prefix of the layouts that name modules as ``<prefix><module with _>``.
PREFIXES = dict(L.UNDERSCORE_PREFIXES)
QKV = L.QKV
FORMAT_NAME = "cascade-train-lora"
FORMAT_VERSION = "1"
DORA_MAGNITUDE = ".dora_magnitude"


class LoraFormatError(CheckpointError):
    """A LoRA file, or the settings that say how to read it (module_filters, model_version, rank),
    does not fit the model."""


class _Entry(AdapterEntry):
    """An :class:`AdapterEntry` with read-only LoRA views (``down``/``up``) for older callers."""

    @property
    def down(self) -> torch.Tensor:
        return self.tensors["lora_down"]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors["lora_up"]


def LoraEntry(target: str, down: torch.Tensor, up: torch.Tensor, alpha: float, block: Optional[int] = None,
              magnitude: Optional[torch.Tensor] = None, dora_scale: Optional[torch.Tensor] = None) -> AdapterEntry:
    """A LoRA (``magnitude``: our DoRA; ``dora_scale``: a tool's DoRA) as a generic record."""
    tensors = {"lora_down": down, "lora_up": up}
    if magnitude is not None:
        tensors["dora_magnitude"] = magnitude
    if dora_scale is not None:
        tensors["dora_scale"] = dora_scale
    return _Entry(target, "dora" if magnitude is not None else "lora", tensors, float(alpha), block)


def _entry(target: str, kind_name: str, tensors: dict, alpha: float, block: Optional[int] = None) -> AdapterEntry:
    return _Entry(target, kind_name, tensors, float(alpha), block)


def _file_names() -> dict:
    return {k: kind(k).file_names for k in kinds()}


# ----------------------------------------------------------------------------------------------
# Layout detection and reading
# ----------------------------------------------------------------------------------------------
def detect_layout(sd: Mapping[str, torch.Tensor], source: str = "LoRA file") -> str:
    """The layout name of ``sd`` (:mod:`modules.adapters.layouts`) or ``tokens`` (token deltas only)."""
    keys = [k for k in sd if not k.startswith("embeddings.")]
    try:
        found = L.detect(keys)
    except ValueError as exc:
        raise LoraFormatError(f"{source}: {exc}") from None
    if found is not None:
        return found
    names = tuple("." + n for n in L.file_tensor_names(_file_names()) if n != "alpha")
    if any(k.endswith(names) for k in keys):
        return "named"
    if "embeddings.embeddings" in sd:
        return "tokens"
    raise LoraFormatError(f"{source}: no LoRA keys found (expected <module>.lora_down, weights.N.lora_down "
                          f"{COMFY_PREFIX}*.lora_down.weight or {KOHYA_PREFIX}*.lora_down.weight, ...); is this a "
                          f"LoRA file?")


def read_tokens(sd: Mapping[str, torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices int64 (n,), deltas (n, width))`` of trained token embeddings, or None."""
    if "embeddings.embeddings" not in sd:
        return None
    if "embeddings.indices" not in sd:
        raise LoraFormatError("LoRA file has embeddings.embeddings but no embeddings.indices")
    return sd["embeddings.indices"].long(), sd["embeddings.embeddings"]


def _split_key(key: str, names: Sequence[str]) -> Optional[tuple[str, str]]:
    for n in names:
        if key.endswith("." + n):
            return key[: -len(n) - 1], n
    return None


def _to_ours(stem: str, found: Mapping[str, torch.Tensor], lay: L.Layout, source: str) -> tuple[str, dict]:
    """A stem's file tensors renamed to a kind's own names; (kind, tensors)."""
    extra = {n: found[n] for n in ("dora_scale",) if n in found}
    for style in (lay.style, "comfy", "peft", "named"):
        for k in reversed(kinds()):  # the more specific kinds first
            mapping = kind(k).file_names.get(style)
            if not mapping:
                continue
            back = {f: ours for ours, f in mapping.items()}
            tensors = {back[n]: t for n, t in found.items() if n in back}
            if tensors and kind_of_tensors(list(tensors)) == k and set(found) <= set(back) | {"alpha", "dora_scale"}:
                try:
                    return k, {**kind(k).from_file(tensors, f"{source}: {stem}"), **extra}
                except KeyError as exc:
                    raise LoraFormatError(f"{source}: {stem} lacks {exc.args[0]}") from None
    raise LoraFormatError(f"{source}: {stem} holds tensors {sorted(found)}, which are no adapter kind known here "
                          f"({', '.join(kinds())})")


def _alpha(stem: str, found: Mapping[str, torch.Tensor], k: str, tensors: Mapping[str, torch.Tensor],
           lay: L.Layout) -> float:
    if "alpha" in found:
        return float(found["alpha"])
    return float(kind(k).record_rank(tensors)) if lay.missing_alpha == "rank" else 1.0


def _check_complete(stem: str, k: str, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    try:
        kind(k).record_delta(tensors, 1.0, _meta_shape(k, tensors))
    except KeyError as exc:
        raise LoraFormatError(f"{source}: {stem} lacks {exc.args[0]}") from None
    except (AdapterError, RuntimeError):
        pass  # shapes are checked against the weight when it is known


def _meta_shape(k: str, tensors: Mapping[str, torch.Tensor]) -> tuple:
    meta = {n: torch.empty(t.shape, device="meta") for n, t in tensors.items()}
    try:
        return tuple(kind(k).record_delta(meta, 1.0, ()).shape)
    except (AdapterError, RuntimeError, KeyError):
        return ()


def _read_stems(sd: Mapping[str, torch.Tensor], param_names: Iterable[str], lay: L.Layout,
                source: str) -> list[AdapterEntry]:
    names = L.file_tensor_names(_file_names())
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith("embeddings."):
            continue
        split = _split_key(key, names)
        if split is None:
            raise LoraFormatError(f"{source}: {key} is not a tensor of any adapter kind known here "
                                  f"({', '.join(kinds())})")
        stems.setdefault(split[0], {})[split[1]] = value
    table = L.stem_table(param_names)
    if lay.name == "named":  # our keys name the parameter itself; a wrong one is reported where it is used
        table.update({s: (s, None, "named") for s in stems if s not in table})
    unknown = [s for s in stems if s not in table]
    if unknown:
        tool = {"kohya": "kohya", "comfyui": "ComfyUI"}.get(lay.name, lay.name)
        raise LoraFormatError(f"{source}: {len(unknown)} {tool} LoRA names match no Stage C module, e.g. "
                              f"{unknown[0]} (text-encoder LoRAs are not supported; wrong stage or model_version?)")
    out = []
    for stem, found in stems.items():
        k, tensors = _to_ours(stem, found, lay, source)
        _check_complete(stem, k, tensors, source)
        target, block, _where = table[stem]
        entry = _entry(target, k, tensors, _alpha(stem, found, k, tensors, lay), block)
        entry.notes["key"] = stem
        out.append(entry)
    return out


def _read_official(sd: Mapping[str, torch.Tensor], targets: Optional[Sequence[str]], source: str) -> list[AdapterEntry]:
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
        out.append(_entry(target, "lora", {"lora_down": down, "lora_up": up}, 1.0))  # official scale 1/rank
    return out


def comfy_stem_table(param_names: Iterable[str], prefix: str = COMFY_PREFIX) -> dict[str, tuple[str, Optional[int]]]:
    """ComfyUI (or, with ``prefix=KOHYA_PREFIX``, kohya) LoRA stem -> (our parameter name, q/k/v
    block or None) for adaptable parameters."""
    return {stem: (target, block) for stem, (target, block, _lay) in L.stem_table(param_names).items()
            if stem.startswith(prefix)}


def read_entries(sd: Mapping[str, torch.Tensor], param_names: Iterable[str],
                 official_targets: Optional[Sequence[str]] = None, source: str = "LoRA file") -> list[AdapterEntry]:
    """All adapter records in ``sd`` (any layout) for a model with parameters ``param_names``."""
    name = detect_layout(sd, source)
    if name == "tokens":
        entries = []
    elif name == "official":
        entries = _read_official(sd, official_targets, source)
    else:
        entries = _read_stems(sd, list(param_names), L.layout(name), source)
    check_entries(entries, source)
    return entries


def check_entries(entries: Sequence[AdapterEntry], source: str = "LoRA file") -> None:
    """LoraFormatError naming the file and the module when a record is inconsistent in itself
    (e.g. a LoRA's ``lora_up`` and ``lora_down`` of different ranks: a damaged or hand-edited file no
    ``rank`` of a run can fit; the kind says: ``Adapter.record_problem``) or has a non-finite ``alpha``."""
    for e in entries:
        problem = e.adapter.record_problem(e.tensors)
        if problem:
            raise LoraFormatError(f"{source}: {e.target}: {problem}")
        if not math.isfinite(float(e.alpha)):
            raise LoraFormatError(f"{source}: {e.target}: alpha is {float(e.alpha)}; the file is damaged")


def _one_rank(entries: Sequence[AdapterEntry], source: str) -> None:
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


def pack_qkv(entries: Sequence[AdapterEntry], source: str = "LoRA file") -> list[AdapterEntry]:
    """Re-join q/k/v blocks into one record of the packed ``in_proj_weight`` (the kind decides
    whether its blocks form one: a LoRA's must share ``lora_down``); LoraFormatError otherwise."""
    plain = [e for e in entries if e.block is None]
    groups: dict[str, dict[int, AdapterEntry]] = {}
    for e in entries:
        if e.block is not None:
            groups.setdefault(e.target, {})[e.block] = e
    for target, parts in groups.items():
        if sorted(parts) != [0, 1, 2]:
            have = [QKV[b] for b in sorted(parts)]
            raise LoraFormatError(f"{source}: {target} has LoRAs only for {have}; a packed attention LoRA needs "
                                  f"to_q, to_k and to_v (merge it with tools/lora_merge.py instead)")
        kinds_here = {parts[b].kind for b in range(3)}
        if len(kinds_here) > 1:
            raise LoraFormatError(f"{source}: {target}: to_q/to_k/to_v are different adapter kinds {sorted(kinds_here)}; "
                                  f"merge the file instead of resuming from it")
        q = parts[0]
        try:
            tensors = q.adapter.join_rows([(parts[b].tensors, parts[b].alpha) for b in range(3)], q.alpha,
                                          f"{source}: {target}")
        except AdapterError as exc:
            raise LoraFormatError(str(exc)) from None
        plain.append(_entry(target, q.kind, tensors, q.alpha))
    return plain


# ----------------------------------------------------------------------------------------------
# Building files
# ----------------------------------------------------------------------------------------------
def _tensors_of(adapter: Any) -> dict[str, torch.Tensor]:
    if isinstance(adapter, Adapter):
        return adapter.tensors()
    if isinstance(adapter, Mapping):
        return dict(adapter)
    return dict(adapter.tensors)  # a record (e.g. gathered FSDP shards)


def named_state_dict(loras: Sequence[tuple[str, Any]], alpha: float,
                     token_indices: Optional[torch.Tensor] = None,
                     token_deltas: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The ``named`` layout (``<target>.<tensor>`` + ``<target>.alpha``) from ``[(target, adapter)]``
    (an :class:`Adapter`, a tensor dict or a record; detached CPU copies).

    The tensors must be plain tensors (a sharded DTensor is gathered by the caller)."""
    sd: dict[str, torch.Tensor] = {}
    if token_deltas is not None:
        sd["embeddings.embeddings"] = token_deltas.detach().float().cpu().clone()
        sd["embeddings.indices"] = token_indices.detach().long().cpu().clone()
    for target, adapter in loras:
        for name, t in _tensors_of(adapter).items():
            sd[f"{target}.{name}"] = _copy(t)
        sd[f"{target}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return sd


def _copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.clone() if t.is_meta else t.cpu().clone()  # meta: export names without weights


def official_state_dict(named: Mapping[str, torch.Tensor], targets_in_order: Sequence[str]) -> dict[str, torch.Tensor]:
    """The official positional layout. The official loader scales by 1/rank, so an ``alpha`` other
    than 1 is folded into ``lora_up``. It holds plain LoRAs only (LoraFormatError naming the kind)."""
    entries = {e.target: e for e in entries_from_named(named)}
    sd: dict[str, torch.Tensor] = {}
    if "embeddings.embeddings" in named:
        sd["embeddings.embeddings"] = named["embeddings.embeddings"]
        sd["embeddings.indices"] = named["embeddings.indices"]
    for i, target in enumerate(targets_in_order):
        e = entries[target]
        if "official" not in e.adapter.file_names:
            raise LoraFormatError(f"the official positional layout holds plain LoRAs only (no DoRA magnitude), not "
                                  f"a {e.adapter.title} ({target}); use the named file or the ComfyUI export")
        up = e.tensors["lora_up"]
        sd[f"weights.{i}.lora_down"] = e.tensors["lora_down"]
        sd[f"weights.{i}.lora_up"] = up if e.alpha == 1.0 else (up.float() * e.alpha).to(up.dtype)
    return sd


def comfyui_key_stems(targets: Iterable[str], prefix: str = COMFY_PREFIX) -> list[str]:
    """The ComfyUI LoRA names (without ``.lora_down.weight`` etc.) an export of ``targets`` has;
    ``prefix=KOHYA_PREFIX`` gives kohya's names (the only difference between the two layouts)."""
    name = next(n for n, p in PREFIXES.items() if p == prefix)
    out = []
    for target in targets:
        found = L.stems(target, name)
        if not found:
            raise LoraFormatError(f"cannot export a LoRA on {target} to ComfyUI/kohya (only .weight / in_proj_weight)")
        out += found
    return out


def is_depthwise(shape: Sequence[int]) -> bool:
    """A grouped conv weight with one input channel per group and a real kernel (our ResBlock
    ``depthwise``): kohya does not adapt such layers and OneTrainer reads a LoRA on them as its
    own depthwise branch (a different function)."""
    return len(shape) == 4 and shape[1] == 1 and tuple(shape[2:]) != (1, 1)


def unloadable_targets(targets: Iterable[str], param_shapes: Mapping[str, Sequence[int]],
                       layout: str) -> dict[str, list[str]]:
    """``{tool: [targets it skips]}`` for an export of ``targets`` in ``layout`` (empty when every
    tool that reads the layout loads every target). Callers warn with the names."""
    depthwise = [t for t in targets if is_depthwise(param_shapes.get(t, ()))]
    if not depthwise:
        return {}
    return {tool: depthwise for tool in L.layout(layout).depthwise_skipped_by}


def export_layout(entries: Sequence[AdapterEntry], layout: str,
                  param_shapes: Optional[Mapping[str, Sequence[int]]] = None, dtype: Optional[torch.dtype] = None,
                  base_weights: Optional[Mapping[str, torch.Tensor]] = None,
                  drop: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state dict in ``layout``, dropped)``: every record in the form the layout's tool reads.

    What the layout cannot express (a kind it has no names for, a DoRA in another normalisation, a
    depthwise-conv adapter its tool reads as something else, a kind whose factors cannot split into
    q/k/v) raises LoraFormatError naming the target and why, unless ``drop``: then it is left out
    and listed as ``"<target>: <why>"``. ``base_weights`` is needed for kinds that need the base
    (a DoRA's ComfyUI ``dora_scale``); ``param_shapes`` for conv weights."""
    lay = L.layout(layout)
    if lay.name == "official":
        raise LoraFormatError("export: the official layout is positional; write it with official_state_dict")
    sd: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    cast = (lambda t: t.to(dtype) if t.is_floating_point() else t) if dtype is not None else (lambda t: t)
    for e in entries:
        if e.block is not None:
            raise LoraFormatError(f"export: {e.target} is a q/k/v block; pack it first")
        shape = tuple((param_shapes or {}).get(e.target, ()))
        base = (base_weights or {}).get(e.target)
        if base is not None and not shape:
            shape = tuple(base.shape)
        try:
            parts = _export_one(e, lay, shape, base)
        except (AdapterError, LoraFormatError) as exc:
            if not drop:
                raise LoraFormatError(f"export to {layout}: {exc}") from None
            dropped.append(f"{e.target}: {exc}")
            continue
        for key, t in parts.items():
            # kept float32: a tool's dora_scale multiplies the weight row by row
            sd[key] = t if key.endswith((".alpha", ".dora_scale")) else cast(t).contiguous()
    return sd, dropped


def _export_one(e: AdapterEntry, lay: L.Layout, shape: tuple, base: Optional[torch.Tensor]) -> dict:
    what = e.target
    adapter = e.adapter
    if lay.kinds is not None and e.kind not in lay.kinds:
        raise AdapterError(f"{what} is a {e.kind}; the {lay.name} layout holds {', '.join(lay.kinds)} only: "
                           f"{lay.kinds_why}")
    if shape and is_depthwise(shape) and not lay.depthwise_ok:
        raise AdapterError(f"{what} is a depthwise conv; {lay.tools} reads a LoRA there as a different function "
                           f"(a full conv to rank r and a 1-channel conv added to every channel), so it would load "
                           f"wrong")
    if adapter.needs_base and lay.dora_form == "comfy" and base is None:
        raise AdapterError(f"{what} is a DoRA; its ComfyUI dora_scale needs the base weight it was trained on "
                           f"(pass the base Stage C checkpoint)")
    tensors = adapter.file_record(e.tensors, e.alpha, shape, lay.style, lay.dora_form, base, what)
    # the written form may be another kind's tensors (our DoRA -> a LoRA + the tool's dora_scale)
    adapter = kind(kind_of_tensors(list(tensors)) or e.kind)
    if "dora_scale" in tensors and lay.dora_form is None:
        raise AdapterError(f"{what} is a DoRA and {lay.tools} has no DoRA")
    alpha = e.alpha
    if not lay.writes_alpha:
        # no alpha key: the reader's default scale (peft: 1) times our scale folded into the first factor
        tensors, alpha = _fold_alpha(e, tensors, lay), None
    stems = L.stems(e.target, lay.name)
    if not stems:
        raise AdapterError(f"{what}: {lay.tools} has no name for this parameter")
    blocks = adapter.split_rows(tensors, 3, what) if len(stems) == 3 else [tensors]
    mapping = {**adapter.file_names[lay.style], "dora_scale": "dora_scale"}
    out = {}
    for stem, block in zip(stems, blocks):
        for name, t in block.items():
            out[f"{stem}.{mapping[name]}"] = t
        if alpha is not None:
            out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32,
                                                device=next(iter(block.values())).device)
    return out


def _fold_alpha(e: AdapterEntry, tensors: dict, lay: L.Layout) -> dict:
    # A layout without alpha keys reads scale 1 (alpha = rank): put alpha/rank into lora_up.
    scale = e.alpha / e.rank
    up = tensors["lora_up"]
    return {**tensors, "lora_up": up if scale == 1.0 else (up.float() * scale).to(up.dtype)}


def export_comfyui(entries: Sequence[AdapterEntry], param_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                   dtype: Optional[torch.dtype] = None,
                   base_weights: Optional[Mapping[str, torch.Tensor]] = None,
                   prefix: str = COMFY_PREFIX) -> dict[str, torch.Tensor]:
    """ComfyUI keys (kohya's with ``prefix=KOHYA_PREFIX``) for ``entries``: :func:`export_layout`
    without dropping. The packed ``in_proj`` LoRA becomes ``to_q``/``to_k``/``to_v`` sharing
    ``lora_down``; a conv LoRA is written as ComfyUI's full conv LoRA with the same update; a DoRA
    gets ComfyUI's ``dora_scale`` (:func:`modules.adapters.dora.comfy_dora_scale`)."""
    name = next(n for n, p in PREFIXES.items() if p == prefix)
    return export_layout(entries, name, param_shapes, dtype, base_weights)[0]


def export_kohya(entries: Sequence[AdapterEntry], param_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                 dtype: Optional[torch.dtype] = None,
                 base_weights: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """kohya's ``lora_unet_`` keys for ``entries`` (plain LoRAs only: kohya has no DoRA/LyCORIS)."""
    return export_layout(entries, "kohya", param_shapes, dtype, base_weights)[0]


def comfy_dora_scale(e: AdapterEntry, base_weight: torch.Tensor) -> torch.Tensor:
    """The ComfyUI ``dora_scale`` of our DoRA record ``e`` on ``base_weight`` (see
    :func:`modules.adapters.dora.comfy_dora_scale`)."""
    if "dora_magnitude" not in e.tensors:
        raise LoraFormatError(f"comfy_dora_scale: {e.target} is not a DoRA")
    delta = kind("lora").record_delta(e.tensors, e.alpha, tuple(base_weight.shape))
    return _comfy_dora_scale(e.tensors["dora_magnitude"], base_weight, delta)


def token_embedding_file(vectors: torch.Tensor, tokens: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A textual-inversion style embedding (``clip_g`` (n, width): the FINAL embedding rows of the
    trained tokens, base row + trained delta) and its metadata (the token strings, in order)."""
    return ({"clip_g": vectors.detach().float().cpu().contiguous()},
            {"tokens": json.dumps(list(tokens)), "format": "cascade-train-token-embeddings"})


# ----------------------------------------------------------------------------------------------
# Loading into trainable adapters, and merging
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def load_into_loras(loras: Sequence[tuple[str, Any]], entries: Sequence[AdapterEntry], alpha: float,
                    source: str = "LoRA file") -> None:
    """Copy ``entries`` into the trainable ``[(target, adapter)]`` of a run with alpha ``alpha``.

    Strict: every adapter of the run needs a record of its kind with the same shapes, and every
    record an adapter. A LoRA file's different alpha is folded into ``lora_up`` (same update)."""
    tool_dora = next((e for e in entries if "dora_scale" in e.tensors), None)
    if tool_dora is not None:
        # A tool's dora_scale is tied to that tool's normalisation (and the base weight), not to a
        # trainable magnitude: such a file can be merged/sampled, not resumed from.
        raise LoraFormatError(f"{source}: {tool_dora.target} is a ComfyUI DoRA (dora_scale, or OneTrainer's); it "
                              f"cannot be loaded as a trainable adapter; merge it (tools/lora_merge.py) or sample "
                              f"with it, or resume from the run's lora.safetensors")
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
    for target, adapter in loras:
        e = by_target[target]
        if e.kind != adapter.kind:
            raise LoraFormatError(f"{source}: {target} is a {e.kind} but this run trains a {adapter.kind}; "
                                  f"set lora_type as the file was trained")
        tensors = dict(e.tensors)
        if "lora_up" in tensors and e.alpha != float(alpha):  # keep the update: fold the alpha ratio into up
            tensors["lora_up"] = (tensors["lora_up"].float() * (e.alpha / float(alpha))).to(tensors["lora_up"].dtype)
        elif e.alpha != float(alpha):
            raise LoraFormatError(f"{source}: {target}: the file's {e.kind} has alpha {e.alpha:g}, this run "
                                  f"{float(alpha):g}; set alpha as the file was trained")
        try:
            adapter.load_tensors(tensors, f"{source}: {target}")
        except AdapterError as exc:
            msg = str(exc)
            if "rank" in msg and "lora_down" in tensors:
                msg += f"; set rank to {e.rank} or check model_version"
            raise LoraFormatError(msg) from None


def _fits(e: AdapterEntry, shape: Sequence[int], source: str) -> None:
    """LoraFormatError (one line: key and reason) when the record's update is not a change of a
    weight of ``shape`` (checked on the meta device: no memory)."""
    meta = {n: torch.empty(t.shape, device="meta") for n, t in e.tensors.items()}
    rows = (shape[0] // 3, *shape[1:]) if e.block is not None else tuple(shape)
    try:
        e.adapter.record_weight(torch.empty(rows, device="meta"), meta, e.alpha)
    except (AdapterError, RuntimeError):
        key = e.notes.get("key", e.target)
        down, up = e.tensors.get("lora_down"), e.tensors.get("lora_up")
        if (down is not None and up is not None and is_depthwise(shape) and up.shape[0] == 1
                and down.dim() == 4 and down.shape[1] == shape[0]):
            raise LoraFormatError(
                f"{source}: {key}: refused: a depthwise-conv LoRA made of a full conv to rank {down.shape[0]} and a "
                f"1-output-channel conv added to every channel (OneTrainer's) is an extra branch, not a change of "
                f"the depthwise weight {tuple(shape)}; it cannot be merged (re-train without depthwise layers or "
                f"drop those keys)") from None
        sizes = {n: tuple(t.shape) for n, t in e.tensors.items()}
        raise LoraFormatError(f"{source}: {e.kind} {key} {sizes} does not fit the weight {tuple(shape)} "
                              f"(LoRA for another model_version?)") from None


def check_fits(entries: Sequence[AdapterEntry], shapes: Mapping[str, Sequence[int]],
               source: str = "LoRA file") -> None:
    """Every record names a parameter of ``shapes`` and is a change of exactly that weight (before
    anything is merged, so a bad file changes nothing)."""
    for e in entries:
        shape = shapes.get(e.target)
        if shape is None:
            raise LoraFormatError(f"{source}: LoRA target {e.target} is not in the checkpoint (wrong model?)")
        _fits(e, tuple(shape), source)


@torch.no_grad()
def merged_weight(weight: torch.Tensor, e: AdapterEntry, strength: float = 1.0,
                  source: str = "LoRA file") -> torch.Tensor:
    """``weight`` changed by record ``e`` at ``strength`` (its third of a packed q/k/v weight when
    ``e.block`` is set), computed in float32 and cast back to the weight's dtype.

    The kind gives the adapted weight ``W'`` (:meth:`Adapter.record_weight`); the result is
    ``W + strength * (W' - W)``, as ComfyUI applies strength (for an additive kind that is
    ``W + strength * delta``; for a DoRA the blend of the whole decomposed weight)."""
    _fits(e, tuple(weight.shape), source)
    merged = weight.float().clone()
    rows = slice(None) if e.block is None else slice(e.block * (weight.shape[0] // 3),
                                                     (e.block + 1) * (weight.shape[0] // 3))
    base = merged[rows]
    tensors = {n: t.to(base.device) for n, t in e.tensors.items()}
    try:
        new = e.adapter.record_weight(base, tensors, e.alpha)
    except AdapterError as exc:
        raise LoraFormatError(f"{source}: {e.target}: {exc}") from None
    strength = float(strength)
    merged[rows] = new if strength == 1.0 else base + strength * (new - base)
    return merged.to(weight.dtype)


@torch.no_grad()
def merge_entries(state_dict: dict[str, torch.Tensor], entries: Sequence[AdapterEntry], strength: float = 1.0,
                  source: str = "LoRA file") -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with every record merged (:func:`merged_weight`); all records are
    checked first. The state dict uses official (plain) key names, so the targets are the keys."""
    check_fits(entries, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    out = dict(state_dict)
    for e in entries:
        out[e.target] = merged_weight(out[e.target], e, strength, source)
    return out


def entries_from_named(sd: Mapping[str, torch.Tensor]) -> list[AdapterEntry]:
    """Records of a ``named`` state dict (convenience for tools/tests)."""
    body = {k: v for k, v in sd.items() if not k.startswith("embeddings.")}
    targets = {k.rsplit(".", 1)[0] for k in body}
    return _read_stems(body, targets, L.layout("named"), "LoRA")


__all__ = ["LoraEntry", "LoraFormatError", "merged_weight", "read_lora_file", "metadata_list",
           "detect_layout", "read_tokens", "read_entries", "pack_qkv", "comfy_stem_table",
           "named_state_dict", "official_state_dict", "comfyui_key_stems", "export_comfyui", "export_kohya",
           "export_layout", "check_entries", "check_fits", "is_depthwise", "unloadable_targets", "KOHYA_PREFIX",
           "PREFIXES",
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
