"""Issue 26 point 1: CPU runs pick their own threading (passive OpenMP wait policy, intra-op
threads from the usable cores) unless the user chose; the choice is logged."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.cpu_threads import pick_thread_count, usable_cores

ROOT = Path(__file__).resolve().parents[1]


def test_thread_count_is_a_share_of_the_usable_cores_minus_the_busy_ones():
    assert pick_thread_count(16) == 16
    assert pick_thread_count(16, local_processes=4) == 4
    assert pick_thread_count(16, load=12.2) == 4     # 12 cores kept busy by others
    assert pick_thread_count(2, load=9.0) == 1       # never below 1
    assert pick_thread_count(8, local_processes=16) == 1
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def _child(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "CASCADE_TRAIN_REEXEC")}
    base.update(env, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=base, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


REEXEC = ("import os; from core.cpu_threads import reexec_with_passive_wait as r; "
          "print('start', os.getpid(), flush=True); r(gpu=False); print(os.environ.get('OMP_WAIT_POLICY'))")


def test_a_cpu_process_restarts_itself_with_the_passive_wait_policy():
    lines = _child(REEXEC).splitlines()
    # started twice with the same pid (exec replaces the process: launchers keep tracking it)
    assert lines[0] == lines[1] and lines[0].startswith("start ")
    assert lines[2] == "PASSIVE"


def test_the_users_wait_policy_is_kept():
    lines = _child(REEXEC, OMP_WAIT_POLICY="ACTIVE").splitlines()
    assert lines == [lines[0], "ACTIVE"]


def test_the_choice_is_logged_and_omp_num_threads_wins():
    code = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s');"
            "from core.cpu_threads import configure_cpu_threads as c; import torch;"
            "print(c(gpu=False)); print(torch.get_num_threads())")
    out = _child(code, OMP_NUM_THREADS="1").splitlines()
    assert "CPU threads: 1 intra-op (from your OMP_NUM_THREADS)" in out[0] and out[1] == "1"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, PYTHONPATH=str(ROOT)))
    assert "usable core(s)" in proc.stdout and int(proc.stdout.split()[-1]) <= usable_cores()


def test_a_run_started_from_python_keeps_its_callers_threads():
    """demo.py and the recipes call the training CLI in-process with their own thread count."""
    import torch

    from core.cpu_threads import configure_cpu_threads

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert "as the calling program set them" in configure_cpu_threads(gpu=False, choose=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
