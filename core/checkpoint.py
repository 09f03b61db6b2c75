"""The run's checkpoint folder: crash-safe saves, retention, backups, resume lookup, RNG state.

Layout of ``run_dir`` (= ``checkpoint_path/experiment_id``)::

    generator.safetensors, generator_ema.safetensors   newest model files (official key layout)
    generator_2k.safetensors                           backups (backup_every)
    state/step_00001000/                               one COMPLETE training state per saved step:
        optimizer.pt scheduler.pt ema.pt rng.pt data.json trainer.json ...
        generator.safetensors ...                      (hard links/copies of that step's model files)
        COMPLETE                                       marker, written before the folder is renamed
    latest                                             "step_00001000", replaced atomically LAST

Save order: everything goes into ``state/step_XXXXXXXX.tmp/`` (fsynced) -> COMPLETE -> rename to
``step_XXXXXXXX`` -> top-level model files replaced atomically -> ``latest`` replaced atomically ->
old folders pruned. A kill -9 at any point leaves ``latest`` naming a complete folder, and a resume
reads the model files from the step folder, so it never mixes a newer model with older state.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from core.atomic import atomic_json, atomic_torch_save, atomic_write_bytes, atomic_write_with, fsync_dir
from core.errors import UserError

__all__ = [
    "atomic_write_bytes", "atomic_torch_save", "atomic_json", "atomic_write_with", "CheckpointManager",
    "capture_rng_state", "restore_rng_state", "backup_name", "load_torch", "load_json", "find_resume",
    "check_writable",
]

log = logging.getLogger(__name__)

FileSpec = Union[Callable[[str], None], bytes, dict]
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_MARKER = "COMPLETE"
_KEEP = "KEEP"


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def backup_name(name: str, step: int) -> str:
    """``generator.safetensors`` at step 20000 -> ``generator_20k.safetensors``; at step 2500 ->
    ``generator_2500.safetensors`` (the reference's ``_{step//1000}k`` collided below 1000)."""
    stem, ext = os.path.splitext(name)
    tag = f"{step // 1000}k" if step % 1000 == 0 else str(step)
    return f"{stem}_{tag}{ext}"


def _write_object(path: str, obj: FileSpec) -> None:
    """Write one named object: callable(path) writer, raw bytes, a dict (``.json`` -> JSON,
    ``.safetensors`` -> tensors, anything else -> torch.save) or any torch-saveable object."""
    if isinstance(obj, torch.nn.Module):  # a module is callable: never treat it as a writer
        obj = obj.state_dict()
    if callable(obj):
        atomic_write_with(path, obj)
    elif isinstance(obj, (bytes, bytearray)):
        atomic_write_bytes(path, bytes(obj))
    elif path.endswith(".json"):
        atomic_json(obj, path)
    elif path.endswith(".safetensors"):
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in obj.items()}
        atomic_write_with(path, lambda tmp: save_file(tensors, tmp))
    else:
        atomic_torch_save(obj, path)


def _link_or_copy(src: str, dst: str) -> None:
    """Atomically make ``dst`` a hard link of ``src`` (a copy where links are impossible)."""

    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write_with(dst, write)


def load_torch(path: str) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (state files hold only tensors/containers)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_json(path: str) -> Any:
    """Read a JSON state file."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class CheckpointManager:
    """Owns ``run_dir``: ``save`` a step, find and ``load`` the latest complete one, ``backup``.

    Only the main rank should write (construct it with ``is_main=False`` on other ranks: it then
    never deletes anything and ``save``/``backup`` do nothing)."""

    def __init__(self, run_dir: str, keep_last: int = 3, is_main: bool = True) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.run_dir = os.path.abspath(run_dir)
        self.state_dir = os.path.join(self.run_dir, "state")
        self.keep_last = keep_last
        self.is_main = is_main
        if is_main:
            try:
                os.makedirs(self.state_dir, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create checkpoint folder {self.state_dir}: {exc.strerror} "
                                "(fix checkpoint_path or its permissions)") from None
            if not os.access(self.run_dir, os.W_OK):
                raise UserError(f"checkpoint folder {self.run_dir} is not writable (fix checkpoint_path or its permissions)")
            self._remove_stale()

    # ------------------------------------------------------------------------------ queries
    def step_dir(self, step: int) -> str:
        """Path of the state folder of ``step``."""
        return os.path.join(self.state_dir, _step_dir_name(step))

    def complete_steps(self) -> list[int]:
        """Steps with a complete state folder, ascending."""
        if not os.path.isdir(self.state_dir):
            return []
        steps = []
        for name in os.listdir(self.state_dir):
            match = _STEP_DIR.match(name)
            if match and os.path.isfile(os.path.join(self.state_dir, name, _MARKER)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> Optional[int]:
        """The step named by ``latest`` (or, if that folder is gone or incomplete, the newest
        complete folder); None for a fresh run."""
        pointer = os.path.join(self.run_dir, "latest")
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as fh:
                match = _STEP_DIR.match(fh.read().strip())
            if match and os.path.isfile(os.path.join(self.state_dir, match.group(0), _MARKER)):
                return int(match.group(1))
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def load(self, step: Optional[int] = None) -> dict[str, str]:
        """Paths of every object saved at ``step`` (default: latest), keyed by file name, plus
        ``"_dir"`` (the step folder). UserError when there is no such complete checkpoint."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise UserError(f"no complete checkpoint in {self.run_dir} (start without --resume or fix the path)")
        folder = self.step_dir(step)
        if not os.path.isfile(os.path.join(folder, _MARKER)):
            raise UserError(f"checkpoint step {step} in {self.state_dir} is missing or incomplete")
        paths = {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))
                 if name not in (_MARKER, _KEEP)}
        paths["_dir"] = folder
        return paths

    # ------------------------------------------------------------------------------- writes
    def save(self, step: int, files: dict[str, FileSpec], state: dict[str, Any]) -> Optional[str]:
        """Save model ``files`` (top level of run_dir, e.g. ``generator.safetensors``) and training
        ``state`` objects (e.g. ``optimizer.pt``, ``data.json``) for ``step``; see the module doc
        for the crash-safe order. Returns the step folder (None on non-main ranks)."""
        if not self.is_main:
            return None
        final = self.step_dir(step)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, obj in state.items():
            self._check_name(name, files)
            _write_object(os.path.join(tmp, name), obj)
        for name, obj in files.items():
            self._check_name(name, {})
            _write_object(os.path.join(tmp, name), obj)
        atomic_write_bytes(os.path.join(tmp, _MARKER), f"{step}\n".encode())
        if os.path.isdir(final):
            # Re-saving a step (e.g. the end save right after a resume): move the old one aside
            # first; latest_step() falls back to the newest complete folder meanwhile.
            old = final + ".old.tmp"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.state_dir)
        for name in files:
            _link_or_copy(os.path.join(final, name), os.path.join(self.run_dir, name))
        atomic_write_bytes(os.path.join(self.run_dir, "latest"), (_step_dir_name(step) + "\n").encode())
        self._prune()
        return final

    def backup(self, step: int, names: list[str], keep_state: bool = False) -> list[str]:
        """Copy (hard-link) the model files ``names`` saved at ``step`` to ``backup_name(name, step)``
        at the top of run_dir. ``keep_state`` also protects that step's state folder from
        retention. Returns the backup paths."""
        if not self.is_main:
            return []
        folder = self.step_dir(step)
        out = []
        for name in names:
            src = os.path.join(folder, name)
            if not os.path.isfile(src):
                raise FileNotFoundError(f"cannot back up {name}: not saved at step {step} ({src})")
            dst = os.path.join(self.run_dir, backup_name(name, step))
            _link_or_copy(src, dst)
            out.append(dst)
        if keep_state:
            atomic_write_bytes(os.path.join(folder, _KEEP), b"backup\n")
        return out

    # ----------------------------------------------------------------------------- internals
    @staticmethod
    def _check_name(name: str, others: dict) -> None:
        if not name or os.sep in name or name.startswith(".") or name in (_MARKER, _KEEP) or name in others:
            raise ValueError(f"invalid or duplicate checkpoint object name {name!r}")

    def _remove_stale(self) -> None:
        """Remove ``.tmp`` leftovers of an interrupted save (folders and temp files)."""
        for folder in (self.state_dir, self.run_dir):
            for name in os.listdir(folder):
                if name.endswith(".tmp"):
                    path = os.path.join(folder, name)
                    log.info("removing leftover of an interrupted save: %s", path)
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete folders, those marked KEEP, and ``latest``."""
        steps = self.complete_steps()
        latest = self.latest_step()
        for step in steps[:-self.keep_last]:
            folder = self.step_dir(step)
            if step == latest or os.path.isfile(os.path.join(folder, _KEEP)):
                continue
            # Rename first so a crash during rmtree leaves a ".tmp" that the next start removes.
            doomed = folder + ".del.tmp"
            os.replace(folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """Python ``random``, numpy, torch CPU and (if available) every CUDA device's RNG state, as
    plain containers and tensors (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what ``capture_rng_state`` captured (CUDA only when both sides have it)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            log.warning("checkpoint has %d CUDA RNG states, this machine has %d devices; restoring the common ones",
                        len(cuda_states), torch.cuda.device_count())
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ------------------------------------------------------------------------------ resume lookup
def find_resume(mode: str, manager: CheckpointManager) -> Optional[tuple[dict[str, str], str]]:
    """``(paths, where)`` of the checkpoint ``--resume mode`` names, or None for a fresh run.

    ``auto``: the run's latest complete checkpoint if any; ``never``: none (existing ones get
    overwritten); a PATH: a ``state/step_*`` folder, or another run folder (fork from its latest)."""
    if mode == "never":
        if manager.latest_step() is not None:
            log.warning("--resume never: ignoring the existing checkpoints in %s (they will be overwritten)",
                        manager.run_dir)
        return None
    if mode == "auto":
        step = manager.latest_step()
        return None if step is None else (manager.load(step), manager.run_dir)
    target = os.path.abspath(mode)
    if os.path.isfile(os.path.join(target, "trainer.json")):
        return {name: os.path.join(target, name) for name in sorted(os.listdir(target))
                if os.path.isfile(os.path.join(target, name))}, target
    if os.path.isdir(target):
        other = CheckpointManager(target, keep_last=10**9, is_main=False)
        step = other.latest_step()
        if step is None:
            raise UserError(f"--resume {mode}: no complete checkpoint in that folder")
        return other.load(step), target
    raise UserError(f"--resume {mode}: not a run folder or a state/step_* folder")


def check_writable(folders: dict[str, Any]) -> None:
    """UserError naming the config key when a run folder cannot be created or written."""
    from pathlib import Path

    for key, folder in folders.items():
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write_test_{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"config key '{key}': cannot write to {folder} ({exc.strerror or exc}); "
                            f"choose a writable folder") from None
