"""diffusers' ``StableCascadeUNet`` layout of Stage C and Stage B: a state-dict adapter.

The networks (``modules.stage_c`` / ``modules.stage_b``) stay pure and keep the official key names;
this module converts state dicts and configs at the boundary, from outside the modules:

* keys: the packed attention ``<block>.attention.attn.in_proj_weight`` / ``in_proj_bias`` are
  diffusers' ``<block>.attention.to_q`` / ``to_k`` / ``to_v`` ``.weight`` / ``.bias`` (rows in thirds),
  ``<block>.attention.attn.out_proj.*`` is ``<block>.attention.to_out.0.*``, and Stage B's
  ``clip_mapper.*`` is ``clip_txt_pooled_mapper.*``; every other key is the same in both layouts.
  The conversion only renames and splits/concatenates rows, so both directions are exact.
* config: :func:`diffusers_config` gives the ``config.json`` fields of ``StableCascadeUNet`` for a
  registered ``(kind, model_version)``; a folder's config is checked against the version the run
  asks for (:func:`check_config`).

A diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``; a folder without
``config.json`` is refused: the head counts are only there) or a single diffusers-layout
safetensors file (read as the configured model_version) is accepted wherever a Stage C / Stage B checkpoint is loaded
(:func:`diffusers_weights_path`, used by ``modules.loading.load_model``). Errors are
:class:`DiffusersFormatError` (a ``CheckpointError``): one line naming the file.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from fileio.errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "StableCascadeUNet"
KINDS = ("stage_c", "stage_b")
_BLOCK_TYPES = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}
_PACKED = ".attention.attn.in_proj_"
_OUT_PROJ = ".attention.attn.out_proj."
_QKV = ("to_q", "to_k", "to_v")
#: Stage B keys that diffusers names differently (the rest of the renames are the attention ones).
_RENAMED = {"stage_b": {"clip_mapper.": "clip_txt_pooled_mapper."}, "stage_c": {}}
#: config fields that do not change the weights (checked loosely: dropout only acts in training).
_NOT_ARCHITECTURE = ("dropout", "_class_name", "_diffusers_version", "_name_or_path")


class DiffusersFormatError(CheckpointError):
    """A diffusers-layout Stage C / Stage B file or folder does not fit the requested model."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DiffusersFormatError(f"the diffusers StableCascadeUNet layout exists for {', '.join(KINDS)}, not {kind}")


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------
def to_diffusers(sd: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Our (official) ``kind`` state dict in diffusers' layout (new dict; tensors are views)."""
    _check_kind(kind)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _PACKED in key:
            block, param = key.split(_PACKED)  # param: "weight" / "bias"
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{block}.attention.{name}.{param}"] = part
        elif _OUT_PROJ in key:
            block, param = key.split(_OUT_PROJ)
            out[f"{block}.attention.to_out.0.{param}"] = value
        else:
            out[_rename(key, _RENAMED[kind])] = value
    return out


def from_diffusers(sd: Mapping[str, torch.Tensor], kind: str, source: str = "diffusers file") -> dict[str, torch.Tensor]:
    """A diffusers ``StableCascadeUNet`` state dict in our (official) layout.

    Raises DiffusersFormatError when a q/k/v projection lacks one of its three parts; every
    other key check is the caller's strict load (which reports missing/unexpected keys)."""
    _check_kind(kind)
    back = {new: old for old, new in _RENAMED[kind].items()}
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        head, sep, tail = key.rpartition(".attention.")
        name = tail.split(".", 1)[0] if sep else ""
        if name in _QKV:
            param = tail.split(".", 1)[1]
            parts.setdefault((head, param), {})[name] = value
        elif sep and tail.startswith("to_out.0."):
            out[f"{head}{_OUT_PROJ}{tail[len('to_out.0.'):]}"] = value
        else:
            out[_rename(key, back)] = value
    for (head, param), qkv in parts.items():
        missing = [n for n in _QKV if n not in qkv]
        if missing:
            raise DiffusersFormatError(f"{source}: {head}.attention has no {', '.join(missing)}.{param} "
                                       f"(an incomplete diffusers StableCascadeUNet file)")
        out[f"{head}{_PACKED}{param}"] = torch.cat([qkv[n] for n in _QKV], dim=0)
    return out


def _rename(key: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def is_diffusers_layout(keys: Any) -> bool:
    """Whether state-dict ``keys`` are diffusers' (split ``attention.to_q`` projections)."""
    return any(".attention.to_q." in k or ".attention.to_out.0." in k for k in keys)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def _our_kwargs(kind: str, model_version: str) -> dict[str, Any]:
    """Every constructor argument of ``kind``/``model_version`` (class defaults + registry)."""
    from modules.registry import model_class, model_config

    try:
        cfg = model_config(kind, model_version)
    except ValueError as exc:
        raise DiffusersFormatError(str(exc)) from None
    params = inspect.signature(model_class(kind).__init__).parameters
    full = {n: p.default for n, p in params.items() if n != "self" and p.default is not inspect.Parameter.empty}
    full.update(cfg)
    return full


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (list, tuple)) else v


def diffusers_config(kind: str, model_version: str) -> dict[str, Any]:
    """The ``config.json`` of diffusers' ``StableCascadeUNet`` for our ``kind``/``model_version``."""
    _check_kind(kind)
    a = _our_kwargs(kind, model_version)
    stage_c = kind == "stage_c"
    cfg = {
        "_class_name": CLASS_NAME,
        "in_channels": a["c_in"], "out_channels": a["c_out"], "timestep_ratio_embedding_dim": a["c_r"],
        "patch_size": a["patch_size"], "conditioning_dim": a["c_cond"], "block_out_channels": a["c_hidden"],
        "num_attention_heads": a["nhead"], "down_num_layers_per_block": a["blocks"][0],
        "up_num_layers_per_block": a["blocks"][1], "down_blocks_repeat_mappers": a["block_repeat"][0],
        "up_blocks_repeat_mappers": a["block_repeat"][1],
        "block_types_per_layer": [[_BLOCK_TYPES[c] for c in level] for level in a["level_config"]],
        "clip_text_in_channels": a["c_clip_text"] if stage_c else None,
        "clip_text_pooled_in_channels": a["c_clip_text_pooled"] if stage_c else a["c_clip"],
        "clip_image_in_channels": a["c_clip_img"] if stage_c else None,
        "clip_seq": a["c_clip_seq"],
        "effnet_in_channels": None if stage_c else a["c_effnet"],
        "pixel_mapper_in_channels": None if stage_c else a["c_pixels"],
        "kernel_size": a["kernel_size"], "dropout": a["dropout"], "self_attn": a["self_attn"],
        "timestep_conditioning_type": a["t_conds"],
        # Stage C resamples with (disabled-interpolation) UpDownBlock2d, Stage B with strided convs.
        "switch_level": a["switch_level"] if stage_c else None,
    }
    return {k: _listify(v) for k, v in cfg.items()}


def _same(a: Any, b: Any) -> bool:
    a, b = _listify(a), _listify(b)
    if isinstance(a, bool) or isinstance(b, bool):
        if isinstance(a, list) or isinstance(b, list):  # diffusers accepts self_attn as bool or per level
            la, lb = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
            return set(la) == set(lb) and len(set(la)) == 1
        return a == b
    return a == b


def check_config(config: Mapping[str, Any], kind: str, model_version: str, source: str) -> None:
    """DiffusersFormatError unless ``config`` (a ``config.json``) describes ``kind``/``model_version``
    (architecture fields; ``dropout`` is the run's own). The message names the differing fields
    and the registered version the config matches, if any."""
    from modules.registry import MODEL_CONFIGS

    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise DiffusersFormatError(f"{source}: config.json is a diffusers {name}, not a {CLASS_NAME}")

    def differences(version: str) -> list[str]:
        ours = diffusers_config(kind, version)
        return [f"{k}: file {config.get(k)!r} vs {ours[k]!r}" for k in ours
                if k not in _NOT_ARCHITECTURE and not _same(config.get(k, _DEFAULTS.get(k)), ours[k])]

    wrong = differences(model_version)
    if not wrong:
        return
    match = next((v for v in MODEL_CONFIGS[kind] if v != model_version and not differences(v)), None)
    hint = f"; it is {kind} model_version {match!r}: set model_version: {match}" if match else ""
    raise DiffusersFormatError(f"{source}: config.json does not describe {kind} model_version {model_version!r} "
                               f"({len(wrong)} fields differ, e.g. {'; '.join(wrong[:3])}){hint}")


#: StableCascadeUNet's defaults for fields a config.json may omit (diffusers fills them the same way).
_DEFAULTS: dict[str, Any] = {"patch_size": 1, "kernel_size": 3, "self_attn": True, "switch_level": None,
                             "clip_text_in_channels": None, "clip_image_in_channels": None,
                             "effnet_in_channels": None, "pixel_mapper_in_channels": None, "clip_seq": 4,
                             "timestep_conditioning_type": ["sca", "crp"], "timestep_ratio_embedding_dim": 64}


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def diffusers_weights_path(path: str | os.PathLike) -> Optional[tuple[Path, Optional[Path]]]:
    """``(weights file, config.json or None)`` when ``path`` is a diffusers model folder or a
    diffusers-layout ``.safetensors`` file (header read only); None for anything else."""
    p = Path(path)
    if p.is_dir():
        weights = p / WEIGHTS_NAME
        if not weights.is_file():
            raise DiffusersFormatError(f"{p}: a folder, but not a diffusers model folder (no {WEIGHTS_NAME}; "
                                       f"sharded or .bin folders are not supported)")
        config = p / CONFIG_NAME
        if not config.is_file():
            # the head counts (and the rest of the architecture that shapes do not show) live only
            # there: a folder without it would load unchecked, with the heads of whatever version is asked
            raise DiffusersFormatError(f"{p}: a diffusers model folder without {CONFIG_NAME}: the attention head "
                                       f"counts are not in the weights, so the folder cannot be checked against "
                                       f"model_version; restore its {CONFIG_NAME} (diffusers and "
                                       f"tools/export_diffusers.py write one), or name the {WEIGHTS_NAME} file "
                                       f"itself to read it as the configured model_version")
        return weights, config
    if p.is_file() and p.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as fh:
                keys = list(fh.keys())
        except Exception:  # noqa: BLE001 - the regular loader reports an unreadable file
            return None
        if is_diffusers_layout(keys):
            config = p.parent / CONFIG_NAME
            return p, config if p.name == WEIGHTS_NAME and config.is_file() else None
    return None


def read_config(path: Path) -> dict[str, Any]:
    """A ``config.json`` as a dict (one-line error naming the file when it is not JSON)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DiffusersFormatError(f"{path}: cannot read the diffusers config ({exc})") from None
    if not isinstance(config, dict):
        raise DiffusersFormatError(f"{path}: a diffusers config must be a JSON object")
    return config


def read_diffusers(path: str | os.PathLike, kind: str, model_version: str) -> dict[str, torch.Tensor]:
    """Our (official) state dict of the diffusers folder/file ``path`` for ``kind``/``model_version``
    (its ``config.json``, when there is one, is checked first). Keys are not checked here."""
    from fileio.state_dicts import read_state_dict

    found = diffusers_weights_path(path)
    if found is None:
        raise DiffusersFormatError(f"{path}: not a diffusers {CLASS_NAME} folder or file")
    weights, config = found
    if config is not None:
        check_config(read_config(config), kind, model_version, str(config))
    return from_diffusers(read_state_dict(weights), kind, str(weights))


def save_diffusers(sd: Mapping[str, torch.Tensor], kind: str, model_version: str, folder: str | os.PathLike,
                   dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``folder/config.json`` + ``folder/diffusion_pytorch_model.safetensors`` (what
    ``StableCascadeUNet.from_pretrained(folder)`` loads) from our ``kind`` state dict."""
    from fileio.state_dicts import save_safetensors

    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise DiffusersFormatError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in to_diffusers(sd, kind).items()}
    save_safetensors(tensors, out / WEIGHTS_NAME, dtype=dtype, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(diffusers_config(kind, model_version), indent=2) + "\n")
    return out


__all__ = ["DiffusersFormatError", "to_diffusers", "from_diffusers", "is_diffusers_layout", "diffusers_config",
           "check_config", "diffusers_weights_path", "read_config", "read_diffusers", "save_diffusers",
           "CONFIG_NAME", "WEIGHTS_NAME", "CLASS_NAME"]
