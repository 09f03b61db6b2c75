"""Preemption as clusters deliver it: SIGTERM / SIGUSR1 sent to a whole process group (what slurm
does to a job step, what `kill -TERM -PGID` does) reaches the DataLoader workers too
(`num_workers: 2`). The workers ignore it; the main process finishes the update, saves one
checkpoint that every rank agrees on, and exits 0; the same command then resumes from it. A
signal during setup ends the run before its first update, also with 0.

Real processes in their own process groups (1 process, torchrun with 2 processes, 2 tasks started
the way srun starts them), real files, gloo on loopback."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.checkpoint import CheckpointManager
from tests.test_train_distributed import free_port
from tests.test_train_e2e import C_CONFIG, config_args, losses, subprocess_env

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

STOPPED = re.compile(r"received (SIG\w+|a stop signal \(on another rank\)): saved the checkpoint of update (\d+) "
                     r"and stopped")
WORKER_DEATH = ("killed by signal", "exited unexpectedly")


def train_args(assets: Path, root: Path, name: str, **extra) -> list[str]:
    settings = dict(experiment_id=name, updates=10000, save_every=10000, batch_size=2, num_workers=2)
    settings.update(extra)
    return config_args(C_CONFIG, assets, root, **settings)


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class Launch:
    """Processes started in one new process group (plus the groups of their own that torchrun
    gives its ranks), output in files; everything still alive is SIGKILLed on ``close``."""

    def __init__(self, cmds: list[tuple[list[str], dict]], logs: Path):
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.groups: set[int] = set()
        for i, (cmd, env) in enumerate(cmds):
            # a new group in this session (a process can only join a group of its own session)
            group = self.procs[0].pid if self.procs else 0
            with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err,
                                                  process_group=group))
        self.pgid = self.procs[0].pid
        self.groups.add(self.pgid)

    def wait_for_updates(self, metrics: Path, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self.procs:  # torchrun's ranks run in sessions of their own: note them
                self.groups.update(children(proc.pid))
            if metrics.is_file() and len(losses(metrics.parent)) >= n:
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        raise AssertionError(f"the run did not reach {n} updates:\n{self.stderr()[-3000:]}")

    def wait_for_output(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and text not in self.stdout():
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        assert text in self.stdout(), self.stderr()[-3000:]

    def signal(self, sig: signal.Signals) -> None:
        os.killpg(self.pgid, sig)

    def wait(self, timeout: float = 120) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.procs]

    def stdout(self) -> str:
        return "".join(p.read_text() for p in sorted(self.logs.rglob("*.out")))

    def stderr(self) -> str:
        return "".join(p.read_text() for p in sorted(self.logs.rglob("*.err")))

    def close(self) -> None:
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs:
            p.wait(timeout=30)


def torchrun(args: list[str], *launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            *launcher, "train/train_c.py", *args]


def srun_tasks(args: list[str]) -> list[tuple[list[str], dict]]:
    """Two tasks as srun starts them (rank from SLURM_PROCID, rendezvous MASTER_ADDR/PORT)."""
    port, cmds = str(free_port()), []
    for rank in range(2):
        env = subprocess_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                             SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="127.0.0.1",
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(var, None)
        cmds.append(([sys.executable, "train/train_c.py", *args], env))
    return cmds


def run_and_signal(cmds: list[tuple[list[str], dict]], run_dir: Path, logs: Path, sig: signal.Signals,
                   start: int = 0) -> tuple[Launch, list[int]]:
    """Start ``cmds``, signal their process group after 3 updates past ``start``, wait."""
    launch = Launch(cmds, logs)
    try:
        launch.wait_for_updates(run_dir / "metrics.jsonl", start + 3)
        launch.signal(sig)
        codes = launch.wait()
    finally:
        launch.close()
    return launch, codes


def assert_one_checkpoint(run_dir: Path, rank_logs: str, ranks: int) -> int:
    """Every rank stopped after the same update N; `latest` names the complete checkpoint of N,
    which holds every rank's data position after N batches; no worker died; returns N."""
    stops = [int(m.group(2)) for m in STOPPED.finditer(rank_logs)]
    assert len(stops) == ranks and len(set(stops)) == 1, rank_logs[-3000:]
    step = stops[0]
    assert not any(s in rank_logs for s in WORKER_DEATH) and "Traceback" not in rank_logs, rank_logs[-3000:]
    assert (run_dir / "latest").read_text().strip() == f"step_{step:08d}"
    assert CheckpointManager(str(run_dir)).latest_step() == step
    state = run_dir / "state" / f"step_{step:08d}"
    assert json.loads((state / "trainer.json").read_text())["step"] == step
    data = json.loads((state / "data.json").read_text())
    assert data["world_size"] == ranks and [r["batches"] for r in data["ranks"]] == [step] * ranks
    assert max(losses(run_dir)) == step
    return step


@pytest.fixture(scope="module")
def assets(train_assets, one_thread):
    return train_assets


PIPELINE_SCRIPT = """
import multiprocessing, os, signal, sys, time
from core.data import DataConfig, build_pipeline

got = []
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda signum, frame: got.append(signal.Signals(signum).name))
pipe = build_pipeline(DataConfig(webdataset_path=sys.argv[1], image_size=64), batch_size=2, num_workers=2)
next(pipe)
workers = multiprocessing.active_children()
for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    try:
        os.killpg(0, sig)  # the whole group: this process and its workers
        time.sleep(0.2)  # the signal arrives meanwhile
    except KeyboardInterrupt:
        got.append("SIGINT")
for _ in range(8):  # two epochs of 16 samples: the workers still serve
    next(pipe)
print(got, len(workers), all(w.is_alive() for w in workers), flush=True)
# exits without pipe.close(): the workers, which ignore SIGTERM, must not hold the exit up
"""


def test_workers_ignore_group_signals_and_end_with_the_main_process(assets, tmp_path):
    script = tmp_path / "pipe.py"
    script.write_text(PIPELINE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(assets / "shards")], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60, process_group=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == "['SIGTERM', 'SIGUSR1', 'SIGINT'] 2 True", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr[-3000:]


def test_one_process_group_sigusr1_sigterm_and_a_signal_during_setup_exit_0_and_resume(assets, tmp_path):
    run_dir = tmp_path / "ck" / "one"
    cmd = [([sys.executable, "train/train_c.py", *train_args(assets, tmp_path, "one")], subprocess_env())]
    first, codes = run_and_signal(cmd, run_dir, tmp_path / "logs1", signal.SIGUSR1)
    assert codes == [0], first.stderr()[-3000:]
    assert "SIGUSR1 received" in first.stderr()
    step = assert_one_checkpoint(run_dir, first.stderr(), ranks=1)
    # the same command resumes from it; SIGTERM stops that run the same way
    second, codes = run_and_signal(cmd, run_dir, tmp_path / "logs2", signal.SIGTERM, start=step)
    assert codes == [0], second.stderr()[-3000:]
    assert f"resuming from update {step} " in second.stdout() and "SIGTERM received" in second.stderr()
    step = assert_one_checkpoint(run_dir, second.stderr(), ranks=1)
    # a signal during setup (the resume is announced before the data and models are built)
    third = Launch(cmd, tmp_path / "logs3")
    try:
        third.wait_for_output(f"resuming from update {step} ")
        third.signal(signal.SIGTERM)
        codes = third.wait()
    finally:
        third.close()
    assert codes == [0], third.stderr()[-3000:]
    assert f"received SIGTERM during setup: stopped before update {step + 1};" in third.stderr()
    assert CheckpointManager(str(run_dir)).latest_step() == step == max(losses(run_dir))


def test_two_processes_torchrun_sigterm_then_srun_tasks_sigusr1(assets, tmp_path):
    """torchrun: SIGTERM to its group. torchrun starts every rank in a session of its own and
    forwards the signal to each rank's process group (the rank and its workers); it exits
    non-zero itself, reporting the signal it got, after its ranks stopped: the ranks' own logs
    are checked. (It forwards SIGUSR1 only with --signals-to-handle, README.) Then the run
    resumes as 2 srun-style tasks in one process group, signalled with SIGUSR1 the way slurm
    signals a job step (every process, workers included): both exit 0 after the same update."""
    run_dir = tmp_path / "ck" / "two"
    args = train_args(assets, tmp_path, "two")
    cmd = torchrun(args, "--log-dir", str(tmp_path / "ranks"), "--redirects", "3")
    first, _ = run_and_signal([(cmd, subprocess_env())], run_dir, tmp_path / "logs1", signal.SIGTERM)
    rank_logs = [p.read_text() for p in sorted((tmp_path / "ranks").rglob("stderr.log"))]
    assert len(rank_logs) == 2, first.stderr()[-3000:]
    step = assert_one_checkpoint(run_dir, "".join(rank_logs), ranks=2)

    second, codes = run_and_signal(srun_tasks(args), run_dir, tmp_path / "logs2", signal.SIGUSR1, start=step)
    assert codes == [0, 0], second.stderr()[-3000:]
    assert f"resuming from update {step} " in second.stdout()
    assert second.stderr().count("SIGUSR1 received") == 2  # each task got it itself
    assert assert_one_checkpoint(run_dir, second.stderr(), ranks=2) > step


def test_example_train_sh_sbatch_header_and_a_run_with_slurm_stubs(tmp_path):
    """sbatch reads the #SBATCH lines up to the first command and opens --output before the
    script runs (its folder must exist); the script then runs under stub scontrol/srun."""
    script = ROOT / "example_train.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lines = script.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    header = dict(line.split()[1].partition("=")[::2] for line in lines[:first_command] if line.startswith("#SBATCH"))
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])
    assert header["--signal"] == "USR1@300" and "--requeue" in header
    assert "/" not in header["--output"], "the --output folder must exist before the job starts"

    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")  # scontrol show hostnames
    (stubs / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = subprocess_env(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT),
                         SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_NTASKS="1",
                         SLURM_CPUS_PER_TASK="1", CONFIG="configs/training/finetune_c_3b.yaml")
    proc = subprocess.run(["bash", str(script), "--validate-only"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "config OK: configs/training/finetune_c_3b.yaml" in proc.stdout
    assert "master 127.0.0.1:" in proc.stdout
