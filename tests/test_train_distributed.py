"""torchrun with 2 CPU processes (gloo): DDP and FSDP training match a 1-process run with the same
global batch. The dataset repeats one photograph with one caption, module dropout is off, and every
per-sample random draw is keyed by the GLOBAL sample index, so the runs compute the same math."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_e2e import C_CONFIG, config_args, losses, subprocess_env
from tests.helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def same_image_assets(tmp_path_factory, one_thread):
    from tools.make_demo_assets import make_dataset, make_models

    folder = tmp_path_factory.mktemp("dist_assets")
    make_models(folder, calibration_size=64)
    make_dataset(folder, image_size=64, n_variants=2, n_shards=2, limit=4, same_image=True)
    return folder


def run(assets: Path, root: Path, name: str, nproc: int, **extra) -> Path:
    settings = dict(updates=3, save_every=3, batch_size=4, generator_dropout=0.0, ema_start_iters=1,
                    ema_iters=1, ema_beta=0.9)
    settings.update(extra)
    args = config_args(C_CONFIG, assets, root, experiment_id=name, **settings)
    if nproc == 1:
        cmd = [sys.executable, "train/train_c.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "train/train_c.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "ck" / name


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(same_image_assets, tmp_path, mode):
    single = run(same_image_assets, tmp_path, "single", 1)
    multi = run(same_image_assets, tmp_path, mode, 2, use_fsdp=(mode == "fsdp"))
    l1, l2 = losses(single), losses(multi)
    assert l1.keys() == l2.keys() == {1, 2, 3}
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
    for name in ("generator.safetensors", "generator_ema.safetensors"):
        w1, w2 = load_file(single / name), load_file(multi / name)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=f"{mode} {name} {k}")
    trainer = json.loads((multi / "state" / "step_00000003" / "trainer.json").read_text())
    assert trainer["world_size"] == 2
    data = json.loads((multi / "state" / "step_00000003" / "data.json").read_text())
    assert len(data["ranks"]) == 2
    if mode == "fsdp":  # resuming a sharded run: full optimizer state goes back into the shards
        run(same_image_assets, tmp_path, mode, 2, use_fsdp=True, updates=4)
        assert json.loads((multi / "latest").read_text().strip() and
                          (multi / "state" / "step_00000004" / "trainer.json").read_text())["step"] == 4


def test_slurm_launch_matches_one_process(same_image_assets, tmp_path):
    """Two tasks started the way `srun` starts them (SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS,
    MASTER_ADDR / MASTER_PORT from example_train.sh), no torchrun."""
    single = run(same_image_assets, tmp_path, "single", 1)
    args = config_args(C_CONFIG, same_image_assets, tmp_path, experiment_id="slurm", updates=3, save_every=3,
                       batch_size=4, generator_dropout=0.0, ema_start_iters=1, ema_iters=1, ema_beta=0.9)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = subprocess_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                             SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="127.0.0.1",
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(var, None)
        procs.append(subprocess.Popen([sys.executable, "train/train_c.py", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=HANG_S)
        assert proc.returncode == 0, err[-4000:]
    multi = tmp_path / "ck" / "slurm"
    l1, l2 = losses(single), losses(multi)
    assert all(abs(l1[s] - l2[s]) < 1e-4 for s in l1)
    w1, w2 = load_file(single / "generator.safetensors"), load_file(multi / "generator.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    assert json.loads((multi / "state" / "step_00000003" / "trainer.json").read_text())["world_size"] == 2
