"""The run's checkpoint folder: crash-safe saves, retention, backups, resume lookup, RNG state.

Layout of ``run_dir`` (= ``checkpoint_path/experiment_id``)::

    generator.safetensors, generator_ema.safetensors   newest model files (official key layout)
    generator_2k.safetensors                           backups (backup_every)
    state/step_00001000/                               one COMPLETE training state per saved step:
        optimizer.pt scheduler.pt ema.pt rng.pt data.json trainer.json ...
        generator.safetensors ...                      (hard links/copies of that step's model files)
        COMPLETE                                       marker, written before the folder is renamed:
                                                       {"step": N, "files": {name: size in bytes}}
    latest                                             "step_00001000", replaced atomically LAST

Save order: everything goes into ``state/step_XXXXXXXX.tmp/`` (fsynced) -> COMPLETE -> rename to
``step_XXXXXXXX`` -> top-level model files replaced atomically -> ``latest`` replaced atomically ->
old folders pruned. A kill -9 at any point leaves ``latest`` naming a complete folder, and a resume
reads the model files from the step folder, so it never mixes a newer model with older state.

A save that fails (disk full, read-only file system, ...) removes its ``.tmp`` folder and raises a
one-line :class:`fileio.errors.WriteError` naming the file, the OS reason and the update ``latest``
still names. On resume, :func:`find_resume` checks every file of the chosen folder (size against
the COMPLETE manifest, then the format can be read) before anything is restored; a folder that
fails is reported in one warning line and the next older complete one is tried.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from core.errors import UserError
from fileio.atomic import atomic_json, atomic_torch_save, atomic_write_bytes, atomic_write_with, fsync_dir
from fileio.errors import WriteError
from fileio.state_dicts import save_safetensors

__all__ = [
    "CheckpointManager", "capture_rng_state", "restore_rng_state", "backup_name", "load_torch", "load_json",
    "find_resume", "check_writable", "check_state_folder", "DEFAULT_CHECKS", "refuse_broken_weights",
    "refuse_nonfinite", "write_on_main_rank",
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
        save_safetensors(obj, path)
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
            with open(pointer, encoding="utf-8", errors="replace") as fh:
                match = _STEP_DIR.match(fh.read().strip())
            if match and os.path.isfile(os.path.join(self.state_dir, match.group(0), _MARKER)):
                return int(match.group(1))
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def latest_note(self) -> str:
        """``"`latest` still names update N in RUN_DIR"`` (or that no checkpoint exists), for the
        message of an error that stops the run without saving."""
        step = self.latest_step()
        if step is None:
            return f"no checkpoint was written in {self.run_dir}"
        return f"`latest` still names update {step} in {self.run_dir}"

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
        for the crash-safe order. Returns the step folder (None on non-main ranks).

        A write that fails for an OS reason raises :class:`WriteError` (one line: the update, the
        file, the reason, the update ``latest`` still names); the ``.tmp`` folder is removed."""
        if not self.is_main:
            return None
        try:
            return self._save(step, files, state)
        except WriteError as exc:
            raise exc.with_context(f"cannot save the checkpoint of update {step} ({self.latest_note()}): ") from exc

    def _save(self, step: int, files: dict[str, FileSpec], state: dict[str, Any]) -> str:
        final = self.step_dir(step)
        tmp = final + ".tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for name, obj in state.items():
                self._check_name(name, files)
                _write_object(os.path.join(tmp, name), obj)
            for name, obj in files.items():
                self._check_name(name, {})
                _write_object(os.path.join(tmp, name), obj)
            sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in [*state, *files]}
            atomic_json({"step": step, "files": sizes}, os.path.join(tmp, _MARKER))
        except BaseException as exc:
            # Nothing of this step is visible yet: drop the partial folder (best effort: on a
            # read-only file system it stays, and the next start removes ``.tmp`` leftovers).
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno:  # makedirs / getsize
                raise WriteError(exc.filename or tmp, exc.errno, exc.strerror) from exc
            raise
        moved_aside: Optional[str] = None
        try:
            if os.path.isdir(final):
                # Re-saving a step (e.g. the end save right after a resume): move the old one aside
                # first; latest_step() falls back to the newest complete folder meanwhile.
                moved_aside = final + ".old.tmp"
                shutil.rmtree(moved_aside, ignore_errors=True)
                os.replace(final, moved_aside)
            os.replace(tmp, final)
        except OSError as exc:
            if moved_aside is not None and os.path.isdir(moved_aside) and not os.path.isdir(final):
                with contextlib.suppress(OSError):  # put the previous save of this step back
                    os.replace(moved_aside, final)
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteError(final, exc.errno or 0, exc.strerror) from exc
        if moved_aside is not None:
            shutil.rmtree(moved_aside, ignore_errors=True)
        fsync_dir(self.state_dir)
        for name in files:
            _link_or_copy(os.path.join(final, name), os.path.join(self.run_dir, name))
        atomic_write_bytes(os.path.join(self.run_dir, "latest"), (_step_dir_name(step) + "\n").encode())
        try:
            self._prune()
        except OSError as exc:
            raise WriteError(exc.filename or self.state_dir, exc.errno or 0, exc.strerror) from exc
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
        """Remove ``.tmp`` leftovers of an interrupted save (folders and temp files). A step folder
        that was moved aside to be re-saved (``.old.tmp``) and not replaced goes back instead."""
        for folder in (self.state_dir, self.run_dir):
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if name.endswith(".old.tmp") and _STEP_DIR.match(name[:-len(".old.tmp")]):
                    original = path[:-len(".old.tmp")]
                    if not os.path.exists(original) and os.path.isfile(os.path.join(path, _MARKER)):
                        log.info("restoring %s (moved aside by an interrupted save)", original)
                        os.replace(path, original)
                        continue
                if name.endswith(".tmp"):
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
#: ``{file name: check(parsed content) -> problem or None}`` for files whose content the caller
#: knows, run after the format check
ContentChecks = dict[str, Callable[[Any], Optional[str]]]


def _check_trainer_json(state: Any) -> Optional[str]:
    """What is wrong with the core's saved counters (``trainer.json``); None: restorable."""
    if not isinstance(state, dict):
        return f"expected a JSON object, found {type(state).__name__}"
    for key in ("step", "nonfinite_total"):
        value = state.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"'{key}' must be a non-negative integer, found {value!r}"
    return None


def _check_data_json(state: Any) -> Optional[str]:
    """What is wrong with the saved data position (``data.json``: ``core.batches.Batches``)."""
    if not isinstance(state, dict) or not isinstance(state.get("ranks", []), list):
        return "expected a JSON object with a 'ranks' list"
    return None


#: what ``find_resume`` checks by default: the counters and data position every training run saves
DEFAULT_CHECKS: ContentChecks = {"trainer.json": _check_trainer_json, "data.json": _check_data_json}


def check_state_folder(folder: str, checks: Optional[ContentChecks] = None) -> Optional[tuple[str, str]]:
    """``(file name, reason)`` of the first file of the state folder that cannot be restored, or
    None when every file can be read.

    Reads no tensor data: each file's size is compared with the COMPLETE manifest (missing,
    truncated or overwritten files; folders saved before the manifest existed, and folders
    without a marker, skip this), then its format is opened the way the restore reads it
    (core/state.py ``check_file``), then ``checks`` run on the content of the files they name."""
    from core.state import check_file

    manifest = None
    marker = os.path.join(folder, _MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as fh:
                content = json.loads(fh.read())
        except (OSError, ValueError) as exc:
            return _MARKER, f"unreadable ({exc})"
        manifest = content.get("files") if isinstance(content, dict) else None
    if isinstance(manifest, dict):
        for name, size in sorted(manifest.items()):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                return name, "missing"
            actual = os.path.getsize(path)
            if actual != size:
                return name, f"{actual} bytes, {size} were written (truncated or overwritten)"
    for name in sorted(_folder_paths(folder)):
        path = os.path.join(folder, name)
        problem = check_file(path)
        if problem is None and checks and name in checks:
            try:
                problem = checks[name](load_json(path) if name.endswith(".json") else load_torch(path))
            except Exception as exc:  # noqa: BLE001 - a check that trips over the content reports it
                problem = f"unexpected content ({type(exc).__name__}: {exc})"
        if problem is not None:
            return name, problem
    return None


def _folder_paths(folder: str) -> dict[str, str]:
    return {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name not in (_MARKER, _KEEP) and os.path.isfile(os.path.join(folder, name))}


def _newest_loadable(manager: CheckpointManager, checks: Optional[ContentChecks], label: str
                     ) -> Optional[tuple[dict[str, str], str]]:
    """``(paths, where)`` of the newest complete state folder of ``manager`` that passes
    :func:`check_state_folder`, with one warning line per folder that fails; None when there is
    no complete folder at all; UserError when every one fails."""
    latest = manager.latest_step()
    if latest is None:
        return None
    candidates = [latest] + [s for s in reversed(manager.complete_steps()) if s < latest]
    problems = []
    for step in candidates:
        folder = manager.step_dir(step)
        problem = check_state_folder(folder, checks)
        if problem is None:
            if problems:
                log.warning("resuming from the older checkpoint of update %d instead", step)
            return manager.load(step), manager.run_dir
        name, reason = problem
        problems.append(f"{_step_dir_name(step)}/{name}: {reason}")
        log.warning("resume: skipping the checkpoint of update %d: %s: %s", step, os.path.join(folder, name), reason)
    raise UserError(f"{label}: no loadable checkpoint in {manager.state_dir} ({'; '.join(problems)}); "
                    f"restore the files, remove the broken state folders, or start over with --resume never")


def find_resume(mode: str, manager: CheckpointManager, checks: Optional[ContentChecks] = DEFAULT_CHECKS
                ) -> Optional[tuple[dict[str, str], str]]:
    """``(paths, where)`` of the checkpoint ``--resume mode`` names, or None for a fresh run.

    ``auto``: the run's newest complete checkpoint whose files can all be read (a broken one is
    reported in one warning line and the next older one is tried; UserError when none is left);
    ``never``: none (existing ones get overwritten); a PATH: that ``state/step_*`` folder (UserError
    when it cannot be read), or another run folder (fork from its newest readable checkpoint).
    ``checks``: see :func:`check_state_folder`."""
    if mode == "never":
        if manager.latest_step() is not None:
            log.warning("--resume never: ignoring the existing checkpoints in %s (they will be overwritten)",
                        manager.run_dir)
        return None
    if mode == "auto":
        return _newest_loadable(manager, checks, "resume")
    target = os.path.abspath(mode)
    if os.path.isfile(os.path.join(target, "trainer.json")):
        problem = check_state_folder(target, checks)
        if problem is not None:
            raise UserError(f"--resume {mode}: cannot restore {os.path.join(target, problem[0])}: {problem[1]}; "
                            "choose another state folder")
        return _folder_paths(target), target
    if os.path.isdir(target):
        other = CheckpointManager(target, keep_last=10**9, is_main=False)
        found = _newest_loadable(other, checks, f"--resume {mode}")
        if found is None:
            raise UserError(f"--resume {mode}: no complete checkpoint in that folder")
        return found[0], target
    raise UserError(f"--resume {mode}: not a run folder or a state/step_* folder")


# ------------------------------------------------------------------------- guards of the loop
def refuse_broken_weights(params: list[torch.Tensor], step: int, optimizer: torch.optim.Optimizer,
                          manager: CheckpointManager, device: torch.device) -> None:
    """UserError on every rank when update ``step`` left a trained weight non-finite or exploded
    (``core.state.weights_finite`` on each rank's parameters, agreed over ranks).

    The training loop calls it after every applied update rather than only before a save: the
    message names the update that broke the weights, no compute goes into a broken model, and
    the run stops before any save could write it (``latest`` keeps naming the previous
    checkpoint). The cost is one fused norm kernel over the weights and one flag all-reduce."""
    from core import distributed as D
    from core.state import weights_finite

    if D.any_rank(not weights_finite(params), device):
        raise UserError(f"update {step} made the trained weights non-finite or exploded (lr "
                        f"{optimizer.param_groups[0]['lr']:g}); stopped without saving it; "
                        f"{manager.latest_note()}; lower lr (or set grad_clip) and resume")


def refuse_nonfinite(problem: Optional[str], step: int, manager: CheckpointManager, device: torch.device) -> None:
    """UserError on every rank when rank 0 found a NaN/inf in what update ``step`` would save
    (``problem``: ``StateRegistry.nonfinite`` of rank 0's snapshot, None elsewhere)."""
    from core import distributed as D

    if D.any_rank(problem is not None, device):
        raise UserError(f"update {step}: not saving a checkpoint with non-finite values in "
                        f"{problem or 'the state of rank 0'}; {manager.latest_note()}; lower lr and resume from it")


def write_on_main_rank(write: Callable[[], None], is_main: bool, device: torch.device, what: str) -> None:
    """Run ``write`` on the main rank, then raise on every rank when it failed there (the main rank
    re-raises its own error: a disk-full or read-only ``WriteError`` is one line), so no rank waits
    in a collective for a peer that died."""
    from core import distributed as D

    error: Optional[BaseException] = None
    if is_main:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - re-raised below once every rank knows
            error = exc
    if D.any_rank(error is not None, device):
        if error is not None:
            raise error
        raise UserError(f"rank 0 could not write {what} (its error says why); stopping")


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
