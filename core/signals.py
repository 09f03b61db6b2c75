"""Graceful stop: SIGTERM / SIGUSR1 (slurm preemption) finish the current update, save, exit 0.

Only the main process of each rank acts on them: the DataLoader workers ignore them (and SIGINT),
so a signal sent to a whole process group (slurm signals every process of a job step) stops the
run the same way as one sent to the main process alone (core/data/signals.py). Every rank learns
at the same update that some rank received one (``requested`` is a collective), so all ranks save
the same step together. SIGINT (Ctrl-C) is not caught: it stays KeyboardInterrupt, ends the run
at once without saving (exit 130), and ``latest`` keeps naming the last complete checkpoint.
"""
from __future__ import annotations

import logging
import signal
from typing import Optional

import torch

from core import distributed as D
from core.triggers import Triggers

__all__ = ["StopSignals"]

log = logging.getLogger("cascade.train")


class StopSignals:
    """Catches the stop signals while installed; ``requested`` agrees over all ranks."""

    NAMES = ("SIGTERM", "SIGUSR1")

    def __init__(self, run_dir: Optional[str] = None, is_main: bool = True) -> None:
        self.received: Optional[str] = None
        self._old: dict = {}
        # sample now / save now (SIGUSR2, trigger files in ``run_dir``): core/triggers.py
        self.triggers = Triggers(run_dir, is_main) if run_dir is not None else None

    def install(self) -> None:
        if self.triggers is not None:
            self.triggers.install()
        def handler(signum, _frame):
            self.received = signal.Signals(signum).name
            log.warning("%s received: finishing the current update, then saving", self.received)

        for name in self.NAMES:
            if hasattr(signal, name):
                try:
                    self._old[name] = signal.signal(getattr(signal, name), handler)
                except ValueError:  # not the main thread (e.g. a notebook worker)
                    pass

    def requested(self, device: torch.device) -> Optional[str]:
        """The signal's name when any rank received one (collective), else None."""
        if D.any_rank(self.received is not None, device):
            return self.received or "a stop signal (on another rank)"
        return None

    def stopped_during_setup(self, device: torch.device, next_update: int) -> bool:
        """Collective, once before the loop: True (and says so) when a signal came during setup;
        the run then ends before ``next_update``, with nothing trained to save."""
        stop = self.requested(device)
        if stop:
            log.warning("received %s during setup: stopped before update %d; run the same command again to "
                        "resume", stop, next_update)
        return stop is not None

    def restore(self) -> None:
        if self.triggers is not None:
            self.triggers.restore()
        for name, previous in self._old.items():
            signal.signal(getattr(signal, name), previous)
        self._old = {}
