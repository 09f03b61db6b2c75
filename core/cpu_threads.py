"""CPU threading of a run: a passive OpenMP wait policy and an intra-op thread count that fit the
cores this process may use, unless the user chose them (``OMP_WAIT_POLICY``, ``OMP_NUM_THREADS``).

Why: OpenMP's default wait policy spins idle threads; on a CPU that other jobs keep busy, those
spinning threads fight the workers for cores and a tiny Stage C update went from 0.2 s to 20 s
(issue 26, load 8-10). ``OMP_WAIT_POLICY`` is read once, when the OpenMP runtime loads with torch,
so a process that imported torch without it can only get it by starting again:
:func:`reexec_with_passive_wait` replaces the process (same pid, same arguments: torchrun and
slurm keep tracking it) with one whose environment has it. The thread count can be set at any
time before the first parallel kernel (:func:`configure_cpu_threads`).

Torch-free until :func:`configure_cpu_threads` runs (inference and the config code import it).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

__all__ = ["reexec_with_passive_wait", "configure_cpu_threads", "usable_cores", "pick_thread_count"]

log = logging.getLogger("cascade.cpu")

#: set in the environment of the re-executed process, so it never re-executes again
_REEXEC_MARK = "CASCADE_TRAIN_REEXEC"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroups cpusets, slurm), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def pick_thread_count(cores: int, local_processes: int = 1, load: Optional[float] = None) -> int:
    """Intra-op threads of one process: its share of the usable ``cores`` over the processes of
    this machine, minus the cores other programs keep busy (``load``: the 1-minute load average,
    taken before this run does any work), at least 1."""
    share = max(1, cores // max(1, local_processes))
    if load is not None:
        share = min(share, max(1, cores - int(round(load))))
    return share


def _local_processes() -> int:
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        try:
            return max(1, int(os.environ.get(key, "") or 0))
        except ValueError:
            continue
    return 1


def reexec_with_passive_wait(gpu: bool) -> None:
    """On a CPU run whose user did not set ``OMP_WAIT_POLICY``: start this same command again with
    ``OMP_WAIT_POLICY=PASSIVE`` (never returns then). Does nothing on GPU runs, when the user set
    the policy, in a process already re-executed, or when the original command line is unknown."""
    if gpu or "OMP_WAIT_POLICY" in os.environ or os.environ.get(_REEXEC_MARK):
        return
    argv = list(getattr(sys, "orig_argv", []) or [])
    if not argv or not sys.executable:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def configure_cpu_threads(gpu: bool, choose: bool = True) -> str:
    """Set torch's intra-op thread count for a CPU run unless ``OMP_NUM_THREADS`` is set, and log
    the choice; returns the logged description. ``choose=False`` (a run started from Python, e.g.
    demo.py, whose caller set the threads): only log the count in force."""
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "default (spinning)")
    who = ("set by cascade-train" if os.environ.get(_REEXEC_MARK)
           else "yours" if "OMP_WAIT_POLICY" in os.environ else "OpenMP's default")
    if gpu:
        return ""
    cores = usable_cores()
    if not choose:
        threads, why = torch.get_num_threads(), "as the calling program set them"
    elif os.environ.get("OMP_NUM_THREADS"):
        threads, why = torch.get_num_threads(), "from your OMP_NUM_THREADS"
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        threads = pick_thread_count(cores, _local_processes(), load)
        torch.set_num_threads(threads)
        load_text = f", load {load:.1f}" if load is not None else ""
        why = f"{cores} usable core(s){load_text}, {_local_processes()} process(es) here"
    text = (f"CPU threads: {threads} intra-op ({why}); OMP_WAIT_POLICY={policy} ({who}); "
            f"set OMP_NUM_THREADS / OMP_WAIT_POLICY to choose yourself")
    log.info(text)
    return text
