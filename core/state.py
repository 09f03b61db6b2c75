"""The checkpoint registry: named state objects saved together and restored on resume.

A job (or the core) registers an object under the file name it is saved as; the object has
``state_dict()`` and ``load_state_dict(state)`` (torch's ``Stateful`` protocol). The file name's
extension picks the format: ``.safetensors`` (a flat tensor dict, optional ``metadata()`` of the
object), ``.json`` (plain data) or anything else (``torch.save``). Adding state to a run means
registering one object; :class:`core.checkpoint.CheckpointManager` writes the files atomically.

Published entries (the model files users load elsewhere) are also placed at the top of the run
folder and backed up; the others live only in the step folder.

Resume is all-or-nothing per folder: :func:`check_file` opens every file the way :meth:`restore`
reads it (without reading tensor data) before anything is applied (core/checkpoint.py
``check_state_folder``), so a broken folder is skipped whole. Before a save,
:meth:`StateRegistry.nonfinite` finds a NaN/inf tensor in what is about to be written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from core.errors import UserError

__all__ = ["Stateful", "StateRegistry", "ModuleState", "ValueState", "FileState", "check_file", "first_nonfinite", "weights_finite"]


class Stateful(Protocol):
    """What the registry saves: ``state_dict()`` (None on ranks that hold nothing to write) and
    ``load_state_dict(state)``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class _Entry:
    obj: Stateful
    publish: bool
    required: bool
    restore: bool


class StateRegistry:
    """Ordered ``file name -> state object`` entries of one run."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._restored: set[str] = set()

    def register(self, name: str, obj: Stateful, *, publish: bool = False, required: bool = False,
                 restore: bool = True) -> None:
        """Save ``obj`` as ``name`` at every checkpoint. ``publish``: also at the top of the run
        folder (+ backups); ``required``: resuming without it is an error; ``restore=False``:
        written for users only (e.g. a second layout of a published file), never read back."""
        if name in self._entries:
            raise ValueError(f"state {name!r} is registered twice")
        self._entries[name] = _Entry(obj, publish, required, restore)

    def names(self, published: Optional[bool] = None) -> list[str]:
        """Registered file names (only the published / unpublished ones when given)."""
        return [n for n, e in self._entries.items() if published is None or e.publish == published]

    def snapshot(self, names: Optional[list[str]] = None) -> dict[str, Any]:
        """``state_dict()`` of every entry (or of ``names``), in registration order. Every rank
        calls it (some entries gather collectively); values that are None are not written."""
        return {name: entry.obj.state_dict() for name, entry in self._entries.items() if names is None or name in names}

    def writers(self, values: dict[str, Any], crash: Optional[Callable[[str], None]] = None
                ) -> tuple[dict[str, Callable[[str], None]], dict[str, Callable[[str], None]]]:
        """``(published, state)`` dicts of file writers for ``CheckpointManager.save``.
        ``crash(path)`` (a test hook) replaces the writer of the first published file."""
        published: dict[str, Callable[[str], None]] = {}
        state: dict[str, Callable[[str], None]] = {}
        for name, value in values.items():
            if value is None:
                continue
            entry = self._entries[name]
            writer = _writer(name, value, getattr(entry.obj, "metadata", None))
            if entry.publish and crash is not None and not published:
                writer = crash
            (published if entry.publish else state)[name] = writer
        return published, state

    def nonfinite(self, values: dict[str, Any]) -> Optional[str]:
        """``"optimizer.pt (state.3.exp_avg_sq)"``: the first entry of a ``snapshot()`` holding a
        floating tensor with a NaN or an infinity, or None when everything is finite."""
        for name, value in values.items():
            where = first_nonfinite(value)
            if where is not None:
                return f"{name} ({where})" if where else name
        return None

    def restore(self, paths: dict[str, str], where: str) -> None:
        """Load every registered, not yet restored entry whose file is in ``paths``. Called again
        after more objects were registered, it restores only the new ones. Empty ``paths``: a
        fresh run, nothing to restore. The files were checked before (``check_file``), so an error
        here is a mismatch with this run: a one-line UserError naming the file."""
        if not paths:
            return
        for name, entry in self._entries.items():
            if name in self._restored or not entry.restore:
                continue
            path = paths.get(name)
            if path is None:
                if entry.required:
                    raise UserError(f"resume: {name} is missing from the checkpoint in {where}")
                continue
            load_file = getattr(entry.obj, "load_file", None)
            try:
                if callable(load_file):  # objects whose errors name the file (model files)
                    load_file(path)
                else:
                    entry.obj.load_state_dict(_read(path))
            except Exception as exc:  # noqa: BLE001 - user errors pass; the rest gets the file named
                from core.errors import is_user_error

                if is_user_error(exc):
                    raise
                raise UserError(f"resume: cannot restore {path} into this run ({type(exc).__name__}: "
                                f"{str(exc).strip() or 'no message'}); resume with the config it was saved "
                                f"with, or choose another checkpoint with --resume") from exc
            self._restored.add(name)


def _writer(name: str, value: Any, metadata: Optional[Callable[[], dict]]) -> Callable[[str], None]:
    if name.endswith(".safetensors"):
        from fileio.state_dicts import save_safetensors

        meta = metadata() if callable(metadata) else None
        return lambda path: save_safetensors(value, path, metadata=meta)
    if name.endswith(".json"):
        from fileio.atomic import atomic_json

        return lambda path: atomic_json(value, path)
    from fileio.atomic import atomic_torch_save

    return lambda path: atomic_torch_save(value, path)


def check_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be read back the way :meth:`StateRegistry.restore` reads it, or None.

    Opens the format without reading tensor data: a JSON file is parsed; a safetensors file's
    header is parsed and must cover the file exactly; a torch file must be a complete zip archive
    whose pickle loads with its tensors memory-mapped. Catches truncated, overwritten and garbage
    files; a flipped bit inside tensor data goes unnoticed (neither format has checksums that
    torch or safetensors verify)."""
    import zipfile

    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                json.load(fh)
        elif path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as fh:
                fh.keys()
        elif path.endswith((".pt", ".pth", ".ckpt")):
            if not zipfile.is_zipfile(path):
                return "not a complete torch file (no zip archive: truncated or overwritten)"
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - OSError, JSON, safetensors, zip and unpickling errors share no base
        return f"unreadable ({type(exc).__name__}: {_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


def weights_finite(params: list[torch.Tensor]) -> bool:
    """True when every tensor's float32 L2 norm is finite: no NaN, no infinity and no value beyond
    ~1e19 (an exploded update, e.g. lr 1e30, leaves finite but useless floats). One fused norm
    kernel per device (``torch._foreach_norm``, what ``clip_grad_norm_`` uses): about one read of
    the weights, small next to a forward/backward. FSDP parameters are checked shard by shard."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.numel():
            by_device.setdefault(local.device, []).append(local.detach())
    for tensors in by_device.values():
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            return False
    return True


def first_nonfinite(value: Any, _path: str = "") -> Optional[str]:
    """The key path (``"state.3.exp_avg"``, ``""`` for ``value`` itself) of the first floating
    tensor in ``value`` (a tensor or nested dicts/lists/tuples) that holds a NaN or an infinity;
    None when there is none."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            return _path
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_nonfinite(item, f"{_path}.{key}" if _path else str(key))
        if found is not None:
            return found
    return None


def _read(path: str) -> Any:
    if path.endswith(".safetensors"):
        from fileio.state_dicts import read_state_dict

        return read_state_dict(path)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return torch.load(path, map_location="cpu", weights_only=False)


class ModuleState:
    """A network saved as its full (unsharded) state dict in its own key layout, loaded strictly.

    ``get`` returns the module (plain or FSDP2-sharded); only the main rank keeps a CPU copy,
    except under FSDP where the gather is collective."""

    def __init__(self, get: Callable[[], nn.Module], is_main: bool, metadata: Optional[Callable[[], dict]] = None):
        self.get = get
        self.is_main = is_main
        if metadata is not None:
            self.metadata = metadata

    def state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        from core.distributed import full_state_dict, is_sharded

        module = self.get()
        if is_sharded(module) or self.is_main:  # the FSDP gather is collective; rank 0 gets the tensors
            return full_state_dict(module)
        return None

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        from core.distributed import unwrap_model
        from modules.loading import load_state_dict_strict

        load_state_dict_strict(unwrap_model(self.get()), state, source)

    def load_file(self, path: str) -> None:
        """Strict load of a saved file; a mismatch names the file and the first differing keys."""
        self.load_state_dict(_read(path), source=path)


class ValueState:
    """Plain data read and written through two callables (counters, positions)."""

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None]) -> None:  # noqa: A002
        self.get, self.set = get, set

    def state_dict(self) -> Any:
        return self.get()

    def load_state_dict(self, state: Any) -> None:
        self.set(state)


class FileState:
    """A file made from the run at every save (``make()`` -> tensors / data), with optional
    ``metadata()`` for safetensors files and ``read(path)`` when it is loaded back on resume."""

    def __init__(self, make: Callable[[], Any], metadata: Optional[Callable[[], dict]] = None,
                 read: Optional[Callable[[str], None]] = None) -> None:
        self.make, self.read = make, read
        if metadata is not None:
            self.metadata = metadata

    def state_dict(self) -> Any:
        return self.make()

    def load_state_dict(self, state: Any) -> None:
        raise RuntimeError("a FileState is read back through its read(path) callable")

    def load_file(self, path: str) -> None:
        if self.read is None:
            raise RuntimeError(f"{path}: this file is written for users and never read back (restore=False)")
        self.read(path)
