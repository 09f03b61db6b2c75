"""core.checkpoint: atomic writes, crash safety (real kill -9), retention, backups, RNG state."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import CheckpointManager, backup_name, capture_rng_state, load_json, load_torch, restore_rng_state
from core.errors import UserError
from fileio.atomic import atomic_json, atomic_torch_save, atomic_write_bytes


def model_sd(value: float) -> dict:
    return {"w": torch.full((4, 4), value), "b": torch.full((4,), value)}


def save_step(mgr: CheckpointManager, step: int) -> None:
    mgr.save(step, {"generator.safetensors": model_sd(step)},
             {"optimizer.pt": {"step": step, "t": torch.arange(3)}, "data.json": {"pos": step}})


def test_atomic_helpers(tmp_path):
    atomic_write_bytes(str(tmp_path / "a" / "x.bin"), b"abc")
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"abc"
    atomic_json({"k": [1, 2]}, str(tmp_path / "x.json"))
    assert load_json(str(tmp_path / "x.json")) == {"k": [1, 2]}
    atomic_torch_save({"t": torch.ones(2)}, str(tmp_path / "x.pt"))
    assert torch.equal(load_torch(str(tmp_path / "x.pt"))["t"], torch.ones(2))
    with pytest.raises(RuntimeError):  # a failing writer leaves neither a file nor a temp file
        from fileio.atomic import atomic_write_with

        def boom(path):
            Path(path).write_bytes(b"partial")
            raise RuntimeError("disk full")
        atomic_write_with(str(tmp_path / "y.bin"), boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.json", "x.pt"]


def test_save_load_retention_and_layout(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=2)
    assert mgr.latest_step() is None
    with pytest.raises(UserError, match="no complete checkpoint"):
        mgr.load()
    for step in (1, 2, 3, 4):
        save_step(mgr, step)
    assert mgr.complete_steps() == [3, 4] and mgr.latest_step() == 4
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_00000004"
    paths = mgr.load()
    assert set(paths) == {"generator.safetensors", "optimizer.pt", "data.json", "_dir"}
    assert load_json(paths["data.json"]) == {"pos": 4}
    assert torch.equal(load_file(paths["generator.safetensors"])["w"], torch.full((4, 4), 4.0))
    assert torch.equal(load_file(str(tmp_path / "run" / "generator.safetensors"))["b"], torch.full((4,), 4.0))
    assert load_torch(mgr.load(3)["optimizer.pt"])["step"] == 3
    save_step(mgr, 4)  # re-saving the same step replaces it cleanly
    assert mgr.complete_steps() == [3, 4] and not list((tmp_path / "run" / "state").glob("*.tmp"))
    other = CheckpointManager(str(tmp_path / "run"), is_main=False)
    assert other.save(5, {}, {}) is None and other.latest_step() == 4


def test_backups_naming_and_protection(tmp_path):
    assert backup_name("generator.safetensors", 20000) == "generator_20k.safetensors"
    assert backup_name("generator.safetensors", 500) == "generator_500.safetensors"
    assert backup_name("generator_ema.safetensors", 1500) == "generator_ema_1500.safetensors"
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=1)
    save_step(mgr, 1000)
    mgr.backup(1000, ["generator.safetensors"], keep_state=True)
    save_step(mgr, 1500)
    mgr.backup(1500, ["generator.safetensors"])
    save_step(mgr, 2000)
    names = sorted(os.listdir(tmp_path / "run"))
    assert "generator_1k.safetensors" in names and "generator_1500.safetensors" in names
    assert torch.equal(load_file(str(tmp_path / "run" / "generator_1k.safetensors"))["w"], torch.full((4, 4), 1000.0))
    assert mgr.complete_steps() == [1000, 2000]  # 1000 protected by keep_state, 1500 pruned


def test_rng_capture_restore_reproduces_next_numbers(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    state = capture_rng_state()
    atomic_torch_save(state, str(tmp_path / "rng.pt"))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    restore_rng_state(load_torch(str(tmp_path / "rng.pt")))  # weights_only load works
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_unwritable_run_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create checkpoint folder"):
        CheckpointManager(str(blocker / "run"))


CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    import core.checkpoint as ck
    run, phase, flag = sys.argv[1], sys.argv[2], sys.argv[3]
    mgr = ck.CheckpointManager(run, keep_last=5)
    sd = lambda v: {{"w": torch.full((64, 64), float(v))}}
    mgr.save(1, {{"generator.safetensors": sd(1)}}, {{"optimizer.pt": {{"step": 1}}, "data.json": {{"pos": 1}}}})

    def signal_and_hang():
        open(flag, "w").close()
        while True:
            time.sleep(0.05)

    def slow_writer(path):
        # a big state written in pieces; the parent kills us in the middle
        with open(path, "wb") as fh:
            for i in range(1000):
                fh.write(os.urandom(1 << 16))
                fh.flush()
                if i == 3:
                    signal_and_hang()

    state = {{"optimizer.pt": {{"step": 2}}, "data.json": {{"pos": 2}}}}
    if phase == "state":
        state["big.bin"] = slow_writer
    else:  # die after the model files were replaced at the top, before `latest` moves
        real = ck.atomic_write_bytes
        def patched(path, data):
            if os.path.basename(path) == "latest":
                signal_and_hang()
            real(path, data)
        ck.atomic_write_bytes = patched
    mgr.save(2, {{"generator.safetensors": sd(2)}}, state)
""")


def test_kill9_mid_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format())
    phases = ("state", "before_latest")  # killed while writing state / after the model files moved
    procs = {}
    for phase in phases:  # both children at once: their start-up (torch import) dominates
        run, flag = tmp_path / phase / "run", tmp_path / phase / "flag"
        procs[phase] = (subprocess.Popen([sys.executable, str(script), str(run), phase, str(flag)]), run, flag)
    deadline = time.time() + 90
    for proc, run, flag in procs.values():
        while not flag.exists():
            assert proc.poll() is None, "child exited early"
            assert time.time() < deadline, "child never reached the save"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

    for proc, run, flag in procs.values():
        mgr = CheckpointManager(str(run))  # a restart: stale temp folders/files are removed
        assert mgr.latest_step() == 1
        paths = mgr.load()
        assert load_json(paths["data.json"]) == {"pos": 1} and load_torch(paths["optimizer.pt"]) == {"step": 1}
        assert torch.equal(load_file(paths["generator.safetensors"])["w"], torch.full((64, 64), 1.0))
        leftovers = [p for p in list(run.iterdir()) + list((run / "state").iterdir()) if p.name.endswith(".tmp")]
        assert leftovers == []
        save_step(mgr, 2)  # and the run can carry on
        assert mgr.latest_step() == 2
