"""Fault injection for the tests (documented in docs/CONFIG.md, "Environment variables").

``CASCADE_TRAIN_POISON_STEPS=3,5`` fills the first floating tensor of those updates' batches with
NaN; ``CASCADE_TRAIN_CRASH_IN_SAVE=4`` kills the process (SIGKILL) in the middle of writing the
first model file of update 4's checkpoint; ``CASCADE_TRAIN_NAN_WEIGHTS=3`` writes a NaN into the
first trained parameter right after update 3's optimizer step (as an exploding update would).
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Optional

import torch

__all__ = ["POISON_ENV", "CRASH_IN_SAVE_ENV", "NAN_WEIGHTS_ENV", "FaultInjection"]

POISON_ENV = "CASCADE_TRAIN_POISON_STEPS"
CRASH_IN_SAVE_ENV = "CASCADE_TRAIN_CRASH_IN_SAVE"
NAN_WEIGHTS_ENV = "CASCADE_TRAIN_NAN_WEIGHTS"


def _env_steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip().isdigit()}


class FaultInjection:
    """The faults the environment asks for, read once at start-up."""

    def __init__(self) -> None:
        self.poison_steps = _env_steps(POISON_ENV)
        self.crash_steps = _env_steps(CRASH_IN_SAVE_ENV)
        self.nan_weight_steps = _env_steps(NAN_WEIGHTS_ENV)

    def poison(self, batch: dict, step: int) -> dict:
        if step not in self.poison_steps:
            return batch
        key = next(k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
        return dict(batch, **{key: torch.full_like(batch[key], float("nan"))})

    def break_weights(self, params: list[torch.nn.Parameter], step: int) -> None:
        if step in self.nan_weight_steps and params:
            first = params[0].to_local() if hasattr(params[0], "to_local") else params[0]  # FSDP: this rank's shard
            with torch.no_grad():
                first.view(-1)[0] = float("nan")

    def crash_writer(self, step: int) -> Optional[Callable[[str], None]]:
        return _crash_writer if step in self.crash_steps else None


def _crash_writer(path: str) -> None:
    """Die like kill -9 in the middle of writing ``path``."""
    with open(path, "wb") as fh:
        fh.write(b"partial")
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
