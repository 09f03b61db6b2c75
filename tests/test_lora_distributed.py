"""LoRA with several processes: DDP (torchrun, 2 CPU processes, gloo) matches a 1-process run with the
same global batch, token rows included (FSDP: tests/test_adapter_fsdp.py)."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.adapter_assets import cli_args, losses
from tests.helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]

CONFIG = str(ROOT / "configs/training/tiny_c_lora.yaml")


def _env() -> dict:
    import os

    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(adapter_assets):
    """The shared assets plus a shard repeating ONE photo and caption (so the per-rank split of
    the global batch cannot change the math)."""
    from tools.photo_shards import jpeg_bytes, photo_variant, write_tar

    folder = adapter_assets
    same = folder / "same_shards" / "same-0000.tar"
    if not same.is_file():
        jpg = jpeg_bytes(photo_variant(0, 64, 64, seed=1), 95)
        write_tar(str(same), [(f"{i:04d}", {"jpg": jpg, "txt": b"a photo of [tinytok] the astronaut"})
                              for i in range(8)])
    return folder


@pytest.mark.slow
def test_ddp_two_processes_match_one(assets, tmp_path):
    def run(name: str, nproc: int) -> Path:
        args = cli_args(CONFIG, assets, tmp_path, experiment_id=name, updates=2, save_every=2, batch_size=4,
                        webdataset_path=str(assets / "same_shards"), lr=1.0e-2)
        script = [f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"] if nproc > 1 else []
        cmd = [sys.executable, *(["-m", "torch.distributed.run", *script] if nproc > 1 else []),
               "train/train_c_lora.py", *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return tmp_path / "ck" / name

    single, multi = run("single", 1), run("ddp", 2)
    l1, l2 = losses(single), losses(multi)
    assert l1.keys() == l2.keys() == {1, 2}
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
    w1, w2 = load_file(single / "lora.safetensors"), load_file(multi / "lora.safetensors")
    assert w1.keys() == w2.keys() and "embeddings.embeddings" in w1
    assert w1["embeddings.embeddings"].abs().sum() > 0
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
