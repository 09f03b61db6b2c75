"""DataLoader workers and the signals sent to a whole process group.

Slurm delivers a job step's signals (SIGTERM at the time limit or on preemption, SIGUSR1 with
``--signal``) to every process of the step, and Ctrl-C sends SIGINT to the terminal's whole
process group (and SIGUSR2, sample/save now: core/triggers.py): the DataLoader workers receive them too. The main process decides what such a
signal means (the training loop finishes the update, saves and exits); a worker must neither die
of one (the main process would then fail with "DataLoader worker ... is killed by signal" before
it saves) nor print a traceback. DataLoader's own worker set-up lets a worker die of any SIGTERM
that does not come from its parent, and SIGUSR1 / SIGINT keep the parent's handlers (by default:
terminate / KeyboardInterrupt). So every worker ignores them, and none can receive one before it does:

* ``blocked_while_starting()`` holds the signals back in the process that starts the workers,
  so a worker, which inherits the signal mask, cannot receive one before it ignores them; the
  starting process gets any signal that arrived meanwhile as soon as the block ends;
* ``ignore_in_worker()`` (the ``worker_init_fn``) ignores them and lifts the inherited block.

A worker still stops when the main process closes the pipeline or dies (DataLoader's own
shutdown and watchdog), and SIGKILL still ends it.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

__all__ = ["WORKER_IGNORED", "blocked_while_starting", "ignore_in_worker"]

#: the signals a DataLoader worker ignores (those of them the platform has)
WORKER_IGNORED: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT") if hasattr(signal, name))


def ignore_in_worker(_worker_id: int = 0) -> None:
    """``worker_init_fn``: ignore ``WORKER_IGNORED`` in this worker, then unblock them."""
    for sig in WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED)


@contextlib.contextmanager
def blocked_while_starting() -> Iterator[None]:
    """Block ``WORKER_IGNORED`` in the calling thread inside the block (the workers it starts
    inherit the block until ``ignore_in_worker``); the previous mask is restored after it, which
    delivers a signal that arrived in between."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process-group signals to race with
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
