"""Sample now / save now in real runs: a trigger file in the run folder and ``kill -USR2``, handled at
the next update boundary by every rank together (1 process, and torchrun with 2 processes on gloo)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from core.triggers import SAMPLE_FILE, SAVE_FILE, Triggers
from tests.test_preemption import Launch, srun_tasks
from tests.test_train_e2e import C_CONFIG, config_args, subprocess_env


def test_trigger_files_and_signal_in_one_process(tmp_path):
    t = Triggers(tmp_path, is_main=True)
    t.install()
    try:
        cpu = torch.device("cpu")
        assert t.due(cpu) == set()
        (tmp_path / SAVE_FILE).touch()
        assert t.due(cpu) == {"save"} and not (tmp_path / SAVE_FILE).exists()
        assert t.due(cpu) == set()  # seen once
        signal.raise_signal(signal.SIGUSR2)
        assert t.due(cpu) == {"sample", "save"}
        (tmp_path / SAMPLE_FILE).touch()
        assert Triggers(tmp_path, is_main=False).due(cpu) == set()  # other ranks learn it from the main rank
    finally:
        t.restore()


def wait_until(check, launch: Launch, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if any(p.poll() is not None for p in launch.procs):
            break
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen:\n{launch.stderr()[-3000:]}")


def steps(run: Path) -> set[int]:
    """The complete state folders (a folder being written is still ``step_N.tmp``)."""
    import re

    found = (run / "state").glob("step_*") if (run / "state").is_dir() else []
    return {int(p.name[5:]) for p in found if re.fullmatch(r"step_\d{8}", p.name)}


def previews(out: Path) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in out.glob("generator_*.png") if p.stem.rsplit("_", 1)[1].isdigit()}


def exercise(launch: Launch, run: Path, out: Path, usr2_pid) -> None:
    """SAVE_NOW, then SAMPLE_NOW, then ``kill -USR2`` one process, then SIGTERM; each took effect once,
    at one update, on every rank (a rank that disagreed would hang in the collective save)."""
    try:
        launch.wait_for_updates(run / "metrics.jsonl", 2)
        (run / SAVE_FILE).touch()
        wait_until(lambda: bool(steps(run)), launch, "save now")
        assert not (run / SAVE_FILE).exists()
        saved = steps(run)
        (run / SAMPLE_FILE).touch()
        wait_until(lambda: bool(previews(out)), launch, "sample now")
        sampled = previews(out)
        assert len(sampled) == 1 and steps(run) == saved  # SAMPLE_NOW only samples
        launch.wait_for_updates(run / "metrics.jsonl", max(sampled) + 1)
        os.kill(usr2_pid(), signal.SIGUSR2)
        wait_until(lambda: len(steps(run)) == 2 and len(previews(out)) == 2, launch, "USR2: sample and save")
        assert steps(run) - saved == previews(out) - sampled  # both at the same update
        launch.signal(signal.SIGTERM)
        assert launch.wait() == [0] * len(launch.procs), launch.stderr()[-3000:]
    finally:
        launch.close()
    assert "Traceback" not in launch.stderr()
    assert sum("requested: done at this update" in line for line in launch.stderr().splitlines()) == 3


@pytest.fixture(scope="module")
def assets(train_assets):
    return train_assets


def args(assets: Path, root: Path, name: str) -> list[str]:
    return config_args(C_CONFIG, assets, root, experiment_id=name, updates=10000, save_every=10000,
                       preview_every=0, batch_size=2, num_workers=1)


@pytest.mark.slow
def test_sample_and_save_now_one_process(assets, tmp_path):
    cmd = [sys.executable, "train/train_c.py", *args(assets, tmp_path, "now1")]
    launch = Launch([(cmd, subprocess_env())], tmp_path / "logs")
    exercise(launch, tmp_path / "ck" / "now1", tmp_path / "out" / "now1", lambda: launch.procs[0].pid)


@pytest.mark.slow
def test_sample_and_save_now_two_processes(assets, tmp_path):
    """Two ranks (started as srun starts them, gloo on loopback); USR2 goes to rank 1 alone."""
    launch = Launch(srun_tasks(args(assets, tmp_path, "now2")), tmp_path / "logs")
    exercise(launch, tmp_path / "ck" / "now2", tmp_path / "out" / "now2", lambda: launch.procs[1].pid)
