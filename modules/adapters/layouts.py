"""File layouts of adapters: how each tool names a module and its tensors, and what it can hold.

A layout maps our parameter name (``down_blocks.0.2.attention.attn.in_proj_weight``) to the
"stem" its files use for it, and names the tensors in one of the kinds' file styles
(:attr:`modules.adapters.Adapter.file_names`): ``comfy`` (``lora_down.weight``, ``lokr_w1``,
``hada_w1_a``, ...) or ``peft`` (``lora_A.weight``). Layouts that split the packed attention
projection write three stems (q, k, v rows) and are read back by re-joining them.

=================  =====================================================  =====================
layout             stem of ``…attention.attn.in_proj_weight`` (q part)    read by
=================  =====================================================  =====================
named (ours)       ``…attention.attn.in_proj_weight`` (packed)            this project
official           ``weights.{i}`` (positional)                           the official code
comfyui            ``lora_prior_unet_…_attention_attn_to_q``              ComfyUI, OneTrainer
comfyui_model      ``diffusion_model.….attention.attn.to_q``              ComfyUI
kohya              ``lora_unet_…_attention_attn_to_q``                    kohya sd-scripts, ComfyUI
onetrainer         ``unet.….attention.attn.in_proj.0`` (original layout)  OneTrainer
diffusers          ``….attention.to_q`` (+ ``lora_A/lora_B``)              diffusers/PEFT, OneTrainer
=================  =====================================================  =====================

OneTrainer's kohya-style names for Stable Cascade (``lora_prior_unet_…_attn_in_proj_0``, also with
``lora_unet_``) and its diffusers names with ``lora_down``/``lora_up`` and the prefix
``lora_prior_unet.`` are read as aliases of the rows above.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

QKV = ("to_q", "to_k", "to_v")
#: marks a layout that names modules as diffusers' StableCascadeUNet does (modules.diffusers_format)
DIFFUSERS_NAMES = ("diffusers",) * 3


@dataclass(frozen=True)
class Layout:
    """How one tool names adapters (see the module docstring)."""

    name: str
    #: the kinds' file style (``Adapter.file_names`` key)
    style: str
    #: the prefix of every stem
    prefix: str
    #: ``"_"``: module path dots become underscores (kohya-style names); ``"."``: kept
    sep: str
    #: names of the q/k/v parts replacing ``attn.in_proj_weight`` (None: packed, not split)
    qkv: Optional[Tuple[str, str, str]]
    #: the name replacing ``attn.out_proj`` (the attention's output projection)
    out_proj: str = "attn.out_proj"
    #: the DoRA form its tool reads (``comfy``: row form of ComfyUI, ``column``: OneTrainer's), None: no DoRA
    dora_form: Optional[str] = None
    #: kinds it can hold (None: every kind with a file style ``style``)
    kinds: Optional[Tuple[str, ...]] = None
    #: tools that read the layout but cannot load an adapter on a depthwise conv (warned on export)
    depthwise_skipped_by: Tuple[str, ...] = ()
    #: False: its tool reads a depthwise-conv LoRA as something else (export refused unless dropped)
    depthwise_ok: bool = True
    #: scale convention of a file without ``alpha``: ``rank`` (scale 1) or ``one`` (scale 1/rank)
    missing_alpha: str = "rank"
    #: writes ``alpha`` keys (False: alpha is folded into the up factor, scale 1)
    writes_alpha: bool = True
    #: who reads it (docs and messages)
    tools: str = ""
    #: why it holds only ``kinds`` (messages)
    kinds_why: str = ""


LAYOUTS: Dict[str, Layout] = {layout.name: layout for layout in (
    Layout("named", "named", "", ".", None, missing_alpha="one", tools="this project"),
    Layout("official", "official", "weights.", ".", None, kinds=("lora",), missing_alpha="one",
           writes_alpha=False, tools="the official StableCascade code",
           kinds_why="the official loader has lora_down/lora_up only"),
    Layout("comfyui", "comfy", "lora_prior_unet_", "_", ("attn.to_q", "attn.to_k", "attn.to_v"), dora_form="comfy",
           depthwise_skipped_by=("OneTrainer",), tools="ComfyUI, OneTrainer"),
    Layout("comfyui_model", "comfy", "diffusion_model.", ".", ("attn.to_q", "attn.to_k", "attn.to_v"),
           dora_form="comfy", tools="ComfyUI"),
    Layout("kohya", "comfy", "lora_unet_", "_", ("attn.to_q", "attn.to_k", "attn.to_v"), kinds=("lora",),
           depthwise_skipped_by=("kohya", "OneTrainer"), tools="kohya sd-scripts, ComfyUI",
           kinds_why="kohya sd-scripts loads plain LoRAs only (it would ignore a dora_scale or LyCORIS factors "
                     "and merge another weight)"),
    Layout("onetrainer", "comfy", "unet.", ".", ("attn.in_proj.0", "attn.in_proj.1", "attn.in_proj.2"),
           dora_form="column", kinds=("lora", "dora", "loha"), depthwise_ok=False, tools="OneTrainer",
           kinds_why="OneTrainer trains and loads LoRA, DoRA and LoHa"),
    Layout("diffusers", "peft", "", ".", DIFFUSERS_NAMES, kinds=("lora",), depthwise_ok=False,
           writes_alpha=False, tools="diffusers/PEFT, OneTrainer",
           kinds_why="a PEFT LoRA state dict has lora_A/lora_B only"),
)}

#: read-only aliases: (layout whose rules apply, prefix, q/k/v names, out_proj name, separator)
_ALIASES: Tuple[Tuple[str, str, Tuple[str, str, str], str, str], ...] = (
    ("comfyui", "lora_prior_unet_", ("attn.in_proj.0", "attn.in_proj.1", "attn.in_proj.2"), "attn.out_proj", "_"),
    ("kohya", "lora_unet_", ("attn.in_proj.0", "attn.in_proj.1", "attn.in_proj.2"), "attn.out_proj", "_"),
    ("diffusers", "lora_prior_unet.", DIFFUSERS_NAMES, "", "."),
    ("diffusers", "prior.", DIFFUSERS_NAMES, "", "."),
    ("diffusers", "transformer.", DIFFUSERS_NAMES, "", "."),
    ("diffusers", "unet.", DIFFUSERS_NAMES, "", "."),
)
#: kohya-style prefixes; a file must not mix them
UNDERSCORE_PREFIXES = {"comfyui": "lora_prior_unet_", "kohya": "lora_unet_"}


def layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown LoRA layout {name!r} (known: {', '.join(LAYOUTS)})") from None


@functools.lru_cache(maxsize=None)
def _diffusers_paths(target: str) -> Tuple[str, ...]:
    # diffusers' module names are modules.diffusers_format's (one definition of that renaming)
    import torch

    from modules.diffusers_format import to_diffusers

    keys = to_diffusers({target: torch.empty(3, 1, device="meta")}, "stage_c")
    return tuple(k[: -len(".weight")] for k in keys if k.endswith(".weight"))


def _stems(target: str, prefix: str, qkv: Optional[Sequence[str]], out_proj: str, sep: str) -> List[str]:
    if qkv == DIFFUSERS_NAMES:
        paths = list(_diffusers_paths(target))
    elif target.endswith("attn.in_proj_weight") and qkv is not None:
        module = target[: -len("attn.in_proj_weight")]
        paths = [module + part for part in qkv]
    elif target.endswith(".in_proj_weight"):
        paths = []  # a packed projection outside an ``attn`` module: no tool names it
    elif target.endswith("attn.out_proj.weight"):
        paths = [target[: -len("attn.out_proj.weight")] + out_proj]
    elif target.endswith(".weight"):
        paths = [target[: -len(".weight")]]
    else:
        paths = []
    return [prefix + (p.replace(".", "_") if sep == "_" else p) for p in paths]


def stems(target: str, name: str) -> List[str]:
    """The stems layout ``name`` writes for parameter ``target`` (3 for a split q/k/v weight;
    empty when the layout cannot name it)."""
    lay = layout(name)
    if lay.name == "named":
        return [target]
    return _stems(target, lay.prefix, lay.qkv, lay.out_proj, lay.sep)


def stem_table(param_names: Iterable[str]) -> Dict[str, Tuple[str, Optional[int], str]]:
    """stem -> (our parameter, q/k/v block or None, layout) for every layout and alias."""
    table: Dict[str, Tuple[str, Optional[int], str]] = {}
    rules = [(lay.name, lay.prefix, lay.qkv, lay.out_proj, lay.sep) for lay in LAYOUTS.values()
             if lay.name not in ("named", "official")] + [(a, p, q, o, s) for a, p, q, o, s in _ALIASES]
    for name in param_names:
        if not name.endswith((".weight", ".in_proj_weight")):
            continue
        table[name] = (name, None, "named")
        for lay, prefix, qkv, out_proj, sep in rules:
            found = _stems(name, prefix, qkv, out_proj, sep)
            for block, stem in enumerate(found):
                table.setdefault(stem, (name, block if len(found) == 3 else None, lay))
    return table


def detect(keys: Sequence[str]) -> Optional[str]:
    """The layout of a file's keys by their prefixes (None: named or unknown; decided by the caller)."""
    found = [lay for lay, prefix in UNDERSCORE_PREFIXES.items() if any(k.startswith(prefix) for k in keys)]
    if len(found) > 1:
        raise ValueError(f"mixes {UNDERSCORE_PREFIXES['comfyui']}* and {UNDERSCORE_PREFIXES['kohya']}* keys; "
                         f"export it again in one layout")
    if found:
        return found[0]
    if any(k.startswith("weights.") and k.split(".")[1].isdigit() for k in keys):
        return "official"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui_model"
    if any(".lora_A." in k or ".lora_B." in k or k.startswith("lora_prior_unet.") for k in keys):
        return "diffusers"
    if any(k.startswith("unet.") for k in keys):
        return "onetrainer"
    return None


def file_tensor_names(kinds_file_names: Mapping[str, Mapping[str, Mapping[str, str]]]) -> List[str]:
    """Every tensor name a file may use after a stem (longest first), incl. ``alpha`` and ``dora_scale``."""
    names = {"alpha", "dora_scale"}
    for styles in kinds_file_names.values():
        for mapping in styles.values():
            names.update(mapping.values())
    return sorted(names, key=len, reverse=True)
