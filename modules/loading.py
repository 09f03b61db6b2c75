"""Reading, checking, loading and saving flat state dicts (networks.md §8).

``load_model`` builds the parameters on the meta device and assigns the file's tensors one by one in
the requested dtype/device, so a bf16 file loaded as bf16 never passes through float32 and a 3.6B
model never exists twice in memory. Buffers are built for real (they are small), so buffers that are
not stored in files (non-persistent ones) keep their constructed values.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from modules.finite import first_nonfinite_tensor
from modules.registry import build_model, describe_model_version, model_class, model_config

PathLike = Union[str, os.PathLike]
_TORCH_EXTS = (".pt", ".ckpt", ".pth", ".bin")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, cannot be written or does not fit the requested model."""


class StateDictMismatchError(CheckpointError, ValueError):
    """A state dict's keys or shapes differ from the module it is loaded into.

    Also a ValueError because that is what LoRA loading raised before this error type existed.
    """


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


def _check_path(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found ({download_hint(p)})")
    ext = p.suffix.lower()
    if ext != ".safetensors" and ext not in _TORCH_EXTS:
        raise CheckpointError(
            f"{p}: unsupported checkpoint extension {ext!r}; use .safetensors, {', '.join(_TORCH_EXTS)}")
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


def check_finite(weights: Mapping[str, torch.Tensor], source: PathLike, writing: bool = False) -> None:
    """CheckpointError naming ``source`` and the tensor when a floating tensor of ``weights`` holds a
    NaN or an infinity (one fused check, ``modules.finite``). Loaders call it once per input file, so
    a damaged input is named at load, not blamed on the learning rate at the first save; writers
    (``writing=True``) call it before anything is written."""
    name = first_nonfinite_tensor(weights)
    if name is None:
        return
    if writing:
        raise CheckpointError(f"{source}: not written: tensor '{name}' holds NaN or infinite values "
                              f"(a model with non-finite weights is never saved; check the inputs that made it)")
    raise CheckpointError(f"{source}: tensor '{name}' holds NaN or infinite values: this input weight file is "
                          f"damaged or was saved from a diverged run; replace it")


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a flat state dict from .safetensors / .pt / .ckpt (a ``state_dict`` wrapper is removed);
    CheckpointError naming the file and the tensor when one holds a NaN or an infinity."""
    p = _check_path(path)
    sd = dict(_iter_safetensors(p)) if p.suffix.lower() == ".safetensors" else _torch_load(p)
    check_finite(sd, p)
    return sd


def _iter_safetensors(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt header etc.
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e


def _safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of a safetensors file, from its header only (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e


def _file_shapes(path: Path) -> Tuple[Dict[str, Tuple[int, ...]], Optional[Dict[str, torch.Tensor]]]:
    """Key -> shape without reading tensor data for safetensors; .pt files are read (mmap)."""
    if path.suffix.lower() == ".safetensors":
        return _safetensors_shapes(path), None
    sd = _torch_load(path)
    return {k: tuple(v.shape) for k, v in sd.items()}, sd


def detect_model_version(kind: str, path: PathLike) -> Optional[str]:
    """The registered ``model_version`` of ``kind`` that the file at ``path`` holds, or None.

    Only a .safetensors header is read (shapes, no tensor data); other formats return None because
    finding their shapes means loading every tensor. The rule is
    :func:`modules.registry.describe_model_version`. Raises :class:`CheckpointError` when the file
    is missing or unreadable.
    """
    p = _check_path(path)
    if p.suffix.lower() != ".safetensors":
        return None
    shapes = _safetensors_shapes(p)
    return describe_model_version(kind, shapes) if shapes else None


def load_detected(kind: str, path: PathLike, default: str = "default", **kwargs: Any) -> torch.nn.Module:
    """:func:`load_model` at the registered version the file's layout matches (e.g. the demo's
    ``effnet/demo``); ``default`` when none matches, so the strict load names the mismatch."""
    version = detect_model_version(kind, path) or default
    return load_model(kind, version, path, **kwargs)


def _shape_of(v: Any) -> Tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)


def state_dict_mismatch(own: Mapping[str, Any], state_dict: Mapping[str, Any], limit: int = 3) -> Optional[str]:
    """How ``state_dict``'s keys/shapes differ from ``own`` (a module's state dict); None when
    they agree. Values may be tensors or shapes. The text counts the missing, unexpected and
    wrong-shape keys and names the first ``limit`` of each, e.g.
    ``1 missing keys: ['a.weight']; 2 wrong shapes: ['b: file (3,) vs model (4,)', ...]``."""
    ms = {k: _shape_of(v) for k, v in own.items()}
    fs = {k: _shape_of(v) for k, v in state_dict.items()}
    missing = [k for k in ms if k not in fs]
    unexpected = [k for k in fs if k not in ms]
    wrong = [f"{k}: file {fs[k]} vs model {ms[k]}" for k in ms if k in fs and fs[k] != ms[k]]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {items[:limit]}{more}")
    return "; ".join(parts) or None


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    hint: str = "",
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    assign: bool = False,
) -> None:
    """Load ``state_dict`` into ``module`` after checking that keys and shapes match exactly.

    On a mismatch nothing is loaded and :class:`StateDictMismatchError` (a CheckpointError) is
    raised with one line: ``<source>: state dict does not match the module (<report>)<hint>``.
    ``dtype`` converts floating-point entries and ``device`` moves every entry (after the check);
    ``assign=True`` is needed for modules built on the meta device.
    """
    report = state_dict_mismatch(module.state_dict(), state_dict)
    if report is not None:
        raise StateDictMismatchError(f"{source}: state dict does not match the module ({report})"
                                     f"{' ' + hint if hint else ''}")
    wrong_dtype = dtype_mismatch(module.state_dict(), state_dict, source)
    if wrong_dtype is not None:
        raise StateDictMismatchError(wrong_dtype)
    if dtype is not None or device is not None:
        state_dict = {k: _convert(v, dtype or v.dtype, torch.device(device) if device is not None else v.device)
                      for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=assign)


def mismatch_report(
    kind: str,
    model_version: str,
    file_shapes: Mapping[str, Sequence[int]],
    model_shapes: Mapping[str, Sequence[int]],
    source: str,
    limit: int = 5,
) -> Optional[str]:
    """Describe how ``file_shapes`` differs from ``model_shapes``; None when they agree.

    The text names ``source``, the likely registered model_version of the file, and the first
    ``limit`` missing, unexpected and shape-mismatched keys.
    """
    fs = {k: tuple(v) for k, v in file_shapes.items()}
    keys = state_dict_mismatch(model_shapes, fs, limit)
    if keys is None:
        return None
    guess = describe_model_version(kind, fs)
    if guess is None:
        looks = "it matches no registered model_version of this kind"
    elif guess == model_version:
        looks = f"it looks like {kind} model_version {guess!r} but is incomplete or modified"
    else:
        looks = f"it looks like {kind} model_version {guess!r}: set model_version: {guess} in your config"
    return f"{source}: state dict does not match {kind} model_version {model_version!r}; {looks}. {keys}"


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device while buffers are built normally.

    Patches ``nn.Module.register_parameter`` for the duration (process-wide, so not for use while
    other threads construct modules).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def dtype_mismatch(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
                   source: str) -> Optional[str]:
    """A one-line report when a floating-point entry of ``own`` (a module's state dict) is an
    integer/bool tensor in ``state_dict`` (torch would fail deep inside ``load_state_dict``);
    None when every such entry is floating point too."""
    wrong = [k for k, v in state_dict.items() if k in own and own[k].is_floating_point()
             and not (v.is_floating_point() or v.is_complex())]
    if not wrong:
        return None
    first = wrong[0]
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    return (f"{source}: tensor '{first}'{more} is {state_dict[first].dtype} but the network's is floating point "
            f"({own[first].dtype}); the file is not a model checkpoint of this network (corrupt, or written "
            f"by another tool)")


def _convert(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Integer tensors (num_batches_tracked, token indices) keep their dtype.
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def load_model(
    kind: str,
    model_version: str,
    path: PathLike,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Build ``kind``/``model_version`` and load ``path`` into it.

    strict=True (default): keys and shapes must match exactly, else :class:`CheckpointError`
    (which says what the file looks like). strict=False: the model is built with its own init on
    ``device`` and the matching entries are copied in; missing/unexpected keys produce a warning.
    A Stage C / Stage B ``path`` may also be a diffusers ``StableCascadeUNet`` folder or file
    (``modules.diffusers_format``): it is converted to the official layout first, then checked the same way.
    """
    foreign = _read_diffusers(kind, model_version, path)
    p = Path(path) if foreign is not None else _check_path(path)
    device = torch.device(device)
    cls = model_class(kind)
    cfg = model_config(kind, model_version, **overrides)

    if not strict:
        model = build_model(kind, model_version, device=device, dtype=dtype, **overrides)
        sd = foreign if foreign is not None else read_state_dict(p)
        expected = model.state_dict()
        wrong = [k for k, v in sd.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if wrong:
            raise CheckpointError(mismatch_report(kind, model_version, {k: v.shape for k, v in sd.items()},
                                                  {k: v.shape for k, v in expected.items()}, str(p)))
        wrong_dtype = dtype_mismatch(expected, sd, str(p))
        if wrong_dtype is not None:
            raise CheckpointError(wrong_dtype)
        converted = {k: _convert(v, dtype, device) for k, v in sd.items()}
        if any(v.is_floating_point() and v.dtype != dtype for v in sd.values()):  # read_state_dict checked the file
            check_finite(converted, f"{p} (as {dtype})")
        res = model.load_state_dict(converted, strict=False)
        if res.missing_keys or res.unexpected_keys:
            warnings.warn(f"{p}: loaded non-strictly; missing {res.missing_keys[:5]}, "
                          f"unexpected {res.unexpected_keys[:5]}", stacklevel=2)
        return model

    with _parameters_on_meta():
        model = cls(**cfg)
    expected = model.state_dict()
    if foreign is not None:
        shapes, preloaded = {k: tuple(v.shape) for k, v in foreign.items()}, foreign
    else:
        shapes, preloaded = _file_shapes(p)
    report = mismatch_report(kind, model_version, shapes, {k: v.shape for k, v in expected.items()}, str(p))
    if report is not None:
        raise CheckpointError(report)

    # Buffers that are not in the file keep their constructed values; move them first.
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[name] = _convert(buf, dtype, device)

    items = preloaded.items() if preloaded is not None else _iter_safetensors(p)
    converted = {}
    cast = False
    for k, v in items:
        cast = cast or (v.is_floating_point() and v.dtype != dtype)
        wrong_dtype = dtype_mismatch(expected, {k: v}, str(p))
        if wrong_dtype is not None:  # before torch's deep "can require gradients" failure
            raise CheckpointError(wrong_dtype)
        converted[k] = _convert(v, dtype, device)
    del preloaded
    if foreign is None or cast:  # once per input file (read_diffusers checked its file), after a cast
        # (float16 overflows beyond 65504): a damaged input is named here, not at the first save
        check_finite(converted, f"{p} (as {dtype})" if cast else p)
    model.load_state_dict(converted, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{p}: tensors were not initialised by the file: {leftover[:5]}")
    return model


def _read_diffusers(kind: str, model_version: str, path: PathLike) -> Optional[Dict[str, torch.Tensor]]:
    """The official-layout state dict of a diffusers Stage C / B folder or file at ``path``; None
    when ``path`` is in our own layout (or ``kind`` has no diffusers layout)."""
    from modules.diffusers_format import KINDS, diffusers_weights_path, read_diffusers

    if kind not in KINDS or diffusers_weights_path(path) is None:
        return None
    return read_diffusers(path, kind, model_version)


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
    """Write a flat safetensors file atomically (temp file in the same folder, fsync, os.replace),
    with the mode a plain ``open`` gives (0666 minus the process umask).

    ``dtype`` casts floating-point tensors only (integer buffers stay int64). The file gets mode
    0666 minus the umask. A write that fails for an operating-system reason (disk full, read-only
    file system, ...) raises ``CheckpointError`` naming the file and the reason, chained to the
    original error, and leaves no temp file. A tensor holding a NaN or an infinity (after the cast)
    is refused before anything is written: ``CheckpointError`` naming the file and the tensor.
    """
    from safetensors.torch import save_file

    tensors = _flat_tensors(state_dict_or_module, dtype)
    check_finite(tensors, path, writing=True)  # every tool and job writes model files through here
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("save_safetensors: metadata must map str to str")
    path = Path(path)
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp_beside(path)
        mode = os.stat(tmp).st_mode & 0o777  # 0666 minus the umask, read without touching the umask
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata is not None else None)
        os.chmod(tmp, mode)  # safetensors renames a 0600 temp file of its own over ``tmp``
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except Exception as exc:
        reason = _os_reason(exc)
        if reason is None:
            raise
        raise CheckpointError(f"{path}: cannot write the file: {reason}") from exc
    finally:
        if tmp is not None:  # removing can fail on a read-only file system; never hide the real error
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    with contextlib.suppress(OSError):  # persist the rename; not possible on every filesystem
        dir_fd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _create_temp_beside(path: Path) -> Path:
    """A new empty ``.NAME.XXXXXXXX.tmp`` beside ``path`` with mode 0666 minus the umask
    (``tempfile.mkstemp`` forces 0600, which the renamed file would keep)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path}: no free temporary file name")


def _os_reason(exc: BaseException) -> Optional[str]:
    """"No space left on device (errno 28)" for an OSError, or for a safetensors error whose
    message carries "(os error 28)"; None for anything else."""
    if isinstance(exc, OSError) and exc.errno:
        return f"{exc.strerror or os.strerror(exc.errno)} (errno {exc.errno})"
    match = re.search(r"os error (\d+)", str(exc))
    if match:
        code = int(match.group(1))
        return f"{os.strerror(code)} (errno {code})"
    return None
