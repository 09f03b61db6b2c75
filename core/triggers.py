"""Sample now / save now, while a run goes on: ``kill -USR2 <pid>`` or a trigger file in the run folder.

* ``touch <run>/SAMPLE_NOW``: previews (and their CLIP scores) of the update being finished;
* ``touch <run>/SAVE_NOW``: a checkpoint of that update (retention, ``latest`` and the published
  files as at any save);
* ``kill -USR2 <pid>`` (any rank's process, or the whole process group: the DataLoader workers
  ignore it): both.

The main rank looks for the files; every rank notes its own signals; one collective at each update
boundary tells every rank what is due, so all ranks sample / save the same update together. A
trigger file is removed once it has been seen (touch it again for another one). The run goes on
afterwards.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch

from core import distributed as D

__all__ = ["Triggers", "SAMPLE_FILE", "SAVE_FILE"]

log = logging.getLogger("cascade.train")

SAMPLE_FILE = "SAMPLE_NOW"
SAVE_FILE = "SAVE_NOW"
_ORDER = ("sample", "save")


class Triggers:
    """The sample-now / save-now requests of one run (see the module docstring)."""

    SIGNAL = "SIGUSR2"

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.files = {"sample": Path(run_dir) / SAMPLE_FILE, "save": Path(run_dir) / SAVE_FILE}
        self.is_main = is_main
        self.pending: set[str] = set()
        self._old = None

    def install(self) -> None:
        if not hasattr(signal, self.SIGNAL):
            return

        def handler(_signum, _frame):
            self.pending.update(_ORDER)

        try:
            self._old = signal.signal(getattr(signal, self.SIGNAL), handler)
        except ValueError:  # not the main thread
            self._old = None

    def due(self, device: torch.device) -> set[str]:
        """What to do at this update boundary (collective: every rank calls it, all get the same set)."""
        local = set(self.pending)
        self.pending.clear()
        if self.is_main:
            for what, path in self.files.items():
                if path.exists():
                    local.add(what)
                    try:
                        os.remove(path)
                    except OSError:  # removed meanwhile: the request is still taken
                        pass
        flags = torch.tensor([1.0 if what in local else 0.0 for what in _ORDER], device=device)
        if D.is_initialized():
            import torch.distributed as dist

            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        chosen = {what for what, flag in zip(_ORDER, flags.tolist()) if flag > 0}
        if chosen:
            log.info("%s requested: done at this update", " and ".join(f"{w} now" for w in _ORDER if w in chosen))
        return chosen

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(getattr(signal, self.SIGNAL), self._old)
            self._old = None
