"""The checkpoint registry: named state objects saved together and restored on resume.

A job (or the core) registers an object under the file name it is saved as; the object has
``state_dict()`` and ``load_state_dict(state)`` (torch's ``Stateful`` protocol). The file name's
extension picks the format: ``.safetensors`` (a flat tensor dict, optional ``metadata()`` of the
object), ``.json`` (plain data) or anything else (``torch.save``). Adding state to a run means
registering one object; :class:`core.checkpoint.CheckpointManager` writes the files atomically.

Published entries (the model files users load elsewhere) are also placed at the top of the run
folder and backed up; the others live only in the step folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from core.errors import UserError

__all__ = ["Stateful", "StateRegistry", "ModuleState", "ValueState", "FileState"]


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

    def snapshot(self) -> dict[str, Any]:
        """``state_dict()`` of every entry, in registration order. Every rank calls it (some
        entries gather collectively); values that are None are not written."""
        return {name: entry.obj.state_dict() for name, entry in self._entries.items()}

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

    def restore(self, paths: dict[str, str], where: str) -> None:
        """Load every registered, not yet restored entry whose file is in ``paths``. Called again
        after more objects were registered, it restores only the new ones. Empty ``paths``: a
        fresh run, nothing to restore."""
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
            if callable(load_file):  # objects whose errors name the file (model files)
                load_file(path)
            else:
                entry.obj.load_state_dict(_read(path))
            self._restored.add(name)


def _writer(name: str, value: Any, metadata: Optional[Callable[[], dict]]) -> Callable[[str], None]:
    if name.endswith(".safetensors"):
        from modules.loading import save_safetensors

        meta = metadata() if callable(metadata) else None
        return lambda path: save_safetensors(value, path, metadata=meta)
    if name.endswith(".json"):
        from core.atomic import atomic_json

        return lambda path: atomic_json(value, path)
    from core.atomic import atomic_torch_save

    return lambda path: atomic_torch_save(value, path)


def _read(path: str) -> Any:
    if path.endswith(".safetensors"):
        from modules.loading import read_state_dict

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
