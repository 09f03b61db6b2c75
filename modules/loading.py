"""Loading flat state dicts into the registered networks, and checking that they fit.

Files are read and written by :mod:`fileio.state_dicts` (``read_state_dict``, ``save_safetensors``).
``load_model`` builds the parameters on the meta device and assigns the file's tensors one by one in
the requested dtype/device, so a bf16 file loaded as bf16 never passes through float32 and a 3.6B
model never exists twice in memory. Buffers are built for real (they are small), so buffers that are
not stored in files (non-persistent ones) keep their constructed values.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fileio.errors import CheckpointError
from fileio.finite import check_finite
from fileio.state_dicts import PathLike, checkpoint_path, iter_safetensors, read_state_dict, safetensors_shapes
from fileio.state_dicts import file_shapes as read_file_shapes
from modules.registry import build_model, describe_model_version, model_class, model_config


class StateDictMismatchError(CheckpointError, ValueError):
    """A state dict's keys or shapes differ from the module it is loaded into.

    Also a ValueError because that is what LoRA loading raised before this error type existed.
    """


def detect_model_version(kind: str, path: PathLike) -> Optional[str]:
    """The registered ``model_version`` of ``kind`` that the file at ``path`` holds, or None.

    Only a .safetensors header is read (shapes, no tensor data); other formats return None because
    finding their shapes means loading every tensor. The rule is
    :func:`modules.registry.describe_model_version`. Raises :class:`CheckpointError` when the file
    is missing or unreadable.
    """
    p = checkpoint_path(path)
    if p.suffix.lower() != ".safetensors":
        return None
    shapes = safetensors_shapes(p)
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
    p = Path(path) if foreign is not None else checkpoint_path(path)
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
        shapes, preloaded = read_file_shapes(p)
    report = mismatch_report(kind, model_version, shapes, {k: v.shape for k, v in expected.items()}, str(p))
    if report is not None:
        raise CheckpointError(report)

    # Buffers that are not in the file keep their constructed values; move them first.
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[name] = _convert(buf, dtype, device)

    items = preloaded.items() if preloaded is not None else iter_safetensors(p)
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
