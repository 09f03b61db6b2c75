"""LoRA and ControlNet jobs with ``use_fsdp: true`` under torchrun (2 CPU processes, gloo): the frozen
Stage C is sharded per block, the adapter trains, the per-update losses and the saved adapter files
equal a 1-process run with the same global batch (the tolerance of test_train_distributed.py), and a
resumed sharded run continues exactly where a run that never stopped goes.

The dataset repeats one photo and caption, so splitting the global batch over ranks cannot change the
math; every per-sample draw is keyed by the global sample index.
"""
from __future__ import annotations

import json
import os
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
LORA = str(ROOT / "configs/training/tiny_c_lora.yaml")
CANNY = str(ROOT / "configs/training/tiny_c_controlnet_canny.yaml")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(adapter_assets):
    """The shared adapter assets plus a shard repeating ONE photo and caption."""
    from tools.photo_shards import jpeg_bytes, photo_variant, write_tar

    same = adapter_assets / "same_shards" / "same-0000.tar"
    if not same.is_file():
        jpg = jpeg_bytes(photo_variant(0, 64, 64, seed=1), 95)
        write_tar(str(same), [(f"{i:04d}", {"jpg": jpg, "txt": b"a photo of [tinytok] the astronaut"})
                              for i in range(8)])
    return adapter_assets


def _args(config: str, assets: Path, root: Path, name: str, **extra) -> list[str]:
    return cli_args(config, assets, root, experiment_id=name, batch_size=4,
                    webdataset_path=str(assets / "same_shards"), **extra)


def _torchrun(script: str, args: list[str]) -> str:
    """Train ``script`` with 2 torchrun processes; their output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _assert_same_files(a: Path, b: Path, names: tuple[str, ...]) -> None:
    for name in names:
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys(), name
        for k in wa:
            assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape, (name, k)
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")


def _assert_sharded_resume(single: Path, fsdp: Path, log: str, files: tuple[str, ...]) -> None:
    """``fsdp`` (2 updates, then resumed to 3) against ``single`` (3 updates in one go)."""
    assert "resuming from update 2" in log
    l1, l2 = losses(single), losses(fsdp)
    assert l1.keys() == l2.keys() == {1, 2, 3}
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
    _assert_same_files(single / "state" / "step_00000002", fsdp / "state" / "step_00000002", files)
    _assert_same_files(single, fsdp, files)
    trainer = json.loads((fsdp / "state" / "step_00000003" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["step"] == 3
    optimizer = torch.load(fsdp / "state" / "step_00000003" / "optimizer.pt", weights_only=False)
    assert isinstance(optimizer["param_groups"][0]["params"][0], str)  # gathered, keyed by parameter name


def test_lora_fsdp_two_processes_match_one_and_resume(assets, tmp_path):
    """Tokens + LoRA (named, official and ComfyUI files), 2 micro-steps per update: the LoRA is
    sharded with the generator's blocks, the token rows stay in the unsharded text model."""
    common = dict(save_every=2, lr=1.0e-2, grad_accum_steps=2, export_comfyui=True)
    files = ("lora.safetensors", "lora_official.safetensors", "lora_comfyui.safetensors",
             "lora_comfyui_embeddings.safetensors")
    from train.train_c_lora import StageCLoraTrainer

    script = "train/train_c_lora.py"
    assert StageCLoraTrainer.main(_args(LORA, assets, tmp_path, "single", updates=3, **common)) == 0
    first = _torchrun(script, _args(LORA, assets, tmp_path, "fsdp", updates=2, use_fsdp=True, **common))
    # the generator with its frozen base and the LoRAs, sharded per block
    assert "FSDP2: sharded 18 blocks + root of the trained StageC over 2 ranks" in first
    resumed = _torchrun(script, _args(LORA, assets, tmp_path, "fsdp", updates=3, use_fsdp=True, **common))
    single, fsdp = tmp_path / "ck" / "single", tmp_path / "ck" / "fsdp"
    _assert_sharded_resume(single, fsdp, resumed, files)
    lora = load_file(fsdp / "lora.safetensors")
    assert lora["embeddings.embeddings"].abs().sum() > 0  # the token row trained
    assert all(v.dtype == torch.float32 for k, v in lora.items() if k.endswith((".lora_up", ".lora_down")))


def test_controlnet_fsdp_two_processes_match_one_and_resume(assets, tmp_path):
    """The frozen Stage C and the ControlNet are both sharded; EMA and gradient checkpointing on."""
    common = dict(save_every=2, lr=0.1, gradient_checkpointing=True, ema_start_iters=1, ema_iters=1, ema_beta=0.9)
    files = ("controlnet.safetensors", "controlnet_ema.safetensors")
    from train.train_c_controlnet import StageCControlNetTrainer

    script = "train/train_c_controlnet.py"
    assert StageCControlNetTrainer.main(_args(CANNY, assets, tmp_path, "single", updates=3, **common)) == 0
    first = _torchrun(script, _args(CANNY, assets, tmp_path, "fsdp", updates=2, use_fsdp=True, **common))
    assert "FSDP2: sharded 18 blocks + root of the frozen StageC over 2 ranks" in first
    assert "FSDP2: sharded 0 blocks + root of the trained ControlNet over 2 ranks" in first
    resumed = _torchrun(script, _args(CANNY, assets, tmp_path, "fsdp", updates=3, use_fsdp=True, **common))
    _assert_sharded_resume(tmp_path / "ck" / "single", tmp_path / "ck" / "fsdp", resumed, files)
