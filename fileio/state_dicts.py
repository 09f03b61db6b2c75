"""Flat state dicts on disk: read (.safetensors / .pt / .ckpt / .pth / .bin), shapes from a
safetensors header, and the atomic safetensors write.

A state dict here is flat: ``{str: Tensor}`` (a ``state_dict`` wrapper of a torch file is removed).
Loading into a network (meta-device build, strict key/shape checks) is ``modules.loading``'s job.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from fileio.atomic import atomic_write_with
from fileio.errors import CheckpointError
from fileio.finite import check_finite

__all__ = ["PathLike", "TORCH_EXTS", "download_hint", "is_official_file", "checkpoint_path", "read_state_dict", "iter_safetensors",
           "safetensors_shapes", "file_shapes", "save_safetensors"]

PathLike = Union[str, os.PathLike]
#: extensions of torch-pickled state dicts (read with ``weights_only=True``)
TORCH_EXTS = (".pt", ".ckpt", ".pth", ".bin")

# File names models/download_models.sh writes (stage_c_bf16.safetensors, controlnet/canny..., ...).
_OFFICIAL_NAME = re.compile(r"(stage_[abc](_lite)?(_bf16)?|previewer|effnet_encoder|canny|inpainting|"
                            r"super_resolution|lora_fernando_10k)\.safetensors")


def is_official_file(path: PathLike) -> bool:
    """True when ``path`` looks like a file of the official download (in a ``models/`` folder or
    named like one): ``--validate-only`` lists such files as "not downloaded yet"."""
    p = Path(path)
    return "models" in p.parts[:-1] or _OFFICIAL_NAME.fullmatch(p.name) is not None


def download_hint(path: PathLike) -> str:
    """How to get a missing file: the download command when ``path`` looks like an official file
    (in a ``models/`` folder or named like one), else a plain "fix the path"."""
    if is_official_file(path):
        return "download the official weights with `bash models/download_models.sh` (see models/README.md) or fix the path"
    return "check the path in your config"


def checkpoint_path(path: PathLike) -> Path:
    """``path`` as a Path after checking it is an existing file with a supported extension
    (else :class:`CheckpointError` naming the file and how to get it)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found ({download_hint(p)})")
    ext = p.suffix.lower()
    if ext != ".safetensors" and ext not in TORCH_EXTS:
        raise CheckpointError(
            f"{p}: unsupported checkpoint extension {ext!r}; use .safetensors, {', '.join(TORCH_EXTS)}")
    return p


def _unwrap(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor (nested dicts are "
                                  "not supported; save a flat state dict)")
    return dict(obj)


def _torch_load(path: Path) -> Dict[str, torch.Tensor]:
    try:
        # mmap avoids a second in-memory copy; files in the legacy (pre-zip) format cannot be mapped.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    return _unwrap(obj, path)


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a flat state dict from .safetensors / .pt / .ckpt (a ``state_dict`` wrapper is removed);
    CheckpointError naming the file and the tensor when one holds a NaN or an infinity."""
    p = checkpoint_path(path)
    sd = dict(iter_safetensors(p)) if p.suffix.lower() == ".safetensors" else _torch_load(p)
    check_finite(sd, p)
    return sd


def iter_safetensors(path: PathLike) -> Iterator[Tuple[str, torch.Tensor]]:
    """(key, tensor) of a safetensors file one at a time (a caller can convert and drop each)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - corrupt header etc.
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e


def safetensors_shapes(path: PathLike) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of a safetensors file, from its header only (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e


def file_shapes(path: PathLike) -> Tuple[Dict[str, Tuple[int, ...]], Optional[Dict[str, torch.Tensor]]]:
    """(key -> shape, the tensors or None) of a checked checkpoint path: a safetensors header is
    read without tensor data (None); a torch file has to be read (memory-mapped), and its tensors
    are returned so the caller does not read it twice."""
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        return safetensors_shapes(p), None
    sd = _torch_load(p)
    return {k: tuple(v.shape) for k, v in sd.items()}, sd


def _flat_tensors(state: Union[nn.Module, Mapping[str, torch.Tensor]], dtype: Optional[torch.dtype]
                  ) -> Dict[str, torch.Tensor]:
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    out: Dict[str, torch.Tensor] = {}
    seen_ptrs = set()
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"save_safetensors: entry {k!r} is {type(v).__name__}; a flat dict of tensors is required")
        if v.is_meta:
            raise ValueError(f"save_safetensors: entry {k!r} is on the meta device (no data to save)")
        t = v.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        # safetensors refuses entries that share storage: give views and aliases their own copy.
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_ptrs or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen_ptrs.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_safetensors(
    state_dict_or_module: Union[nn.Module, Mapping[str, torch.Tensor]],
    path: PathLike,
    dtype: Optional[torch.dtype] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Write a flat safetensors file atomically (:func:`fileio.atomic.atomic_write_with`), with the
    mode a plain ``open`` gives (0666 minus the process umask).

    ``dtype`` casts floating-point tensors only (integer buffers stay int64). A write that fails for
    an operating-system reason (disk full, read-only file system, ...) raises
    :class:`fileio.errors.WriteError` naming the file and the reason, and leaves no temp file. A
    tensor holding a NaN or an infinity (after the cast) is refused before anything is written:
    :class:`fileio.errors.CheckpointError` naming the file and the tensor.
    """
    from safetensors.torch import save_file

    tensors = _flat_tensors(state_dict_or_module, dtype)
    check_finite(tensors, path, writing=True)  # every tool and job writes model files through here
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("save_safetensors: metadata must map str to str")
    meta = dict(metadata) if metadata is not None else None
    atomic_write_with(str(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
