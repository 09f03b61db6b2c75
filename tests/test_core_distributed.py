"""core.distributed with REAL processes: 2 CPU ranks over gloo on 127.0.0.1.

One spawned job runs every multi-process check (process start-up dominates the cost): init from
torchrun-style variables, all_reduce_mean, broadcast_object, all_gather_cat of unequal sizes, DDP step == 1-process step on the same
global batch (with accumulation and no_sync), FSDP2 fully_shard step == 1-process step, full state
dict with official keys, gradient clipping over sharded + plain gradients, load_full_state_dict round
trip, optimizer state gather.
"""
from __future__ import annotations

import copy
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from core import distributed as D
from core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
               "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID")


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return x + self.lin(self.norm(x))


class Tiny(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, c)
        self.blocks = nn.ModuleList([Block(c), Block(c)])
        self.out = nn.Linear(c, 1)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def make_model_and_batch():
    torch.manual_seed(0)
    model = Tiny()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)


def train_steps(model, x, y, micro: int, wrapped=None, rank: int = 0, world: int = 1, steps: int = 2):
    """``steps`` updates of AdamW on the global batch (x, y): this rank's slice, ``micro`` micro-steps."""
    wrapped = wrapped or model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    per_rank = x.shape[0] // world
    xs, ys = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    for _ in range(steps):
        for m, (xm, ym) in enumerate(zip(xs.chunk(micro), ys.chunk(micro))):
            with D.grad_sync(wrapped, enabled=m == micro - 1):
                loss = nn.functional.mse_loss(wrapped(xm), ym) / micro
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    info = D.init_distributed(prefer_cuda=False, timeout_s=120)
    try:
        assert (info.rank, info.world_size, info.backend, info.is_main) == (rank, 2, "gloo", rank == 0)
        assert D.all_reduce_mean(torch.tensor([float(rank), 2.0])).tolist() == [0.5, 2.0]
        assert D.broadcast_object({"from": rank}) == {"from": 0}
        # unequal row counts (e.g. per-sample values of unequal batches): padded, gathered, trimmed
        got = D.all_gather_cat(torch.full((rank + 1, 3), float(rank)))
        assert got.tolist() == [[0.0] * 3, [1.0] * 3, [1.0] * 3]
        assert D.all_gather_cat(torch.arange(2 - rank, dtype=torch.int64)).tolist() == [0, 1, 0]
        assert D.all_gather_cat(torch.zeros(0) if rank else torch.ones(2)).tolist() == [1.0, 1.0]
        with pytest.raises(ValueError, match=r"differ beyond dim 0: shapes \[\(1, 2\), \(1, 3\)\]"):
            D.all_gather_cat(torch.zeros(1, 2 + rank))   # every rank raises, none hangs
        D.barrier()

        model, x, y = make_model_and_batch()
        reference = copy.deepcopy(model)
        train_steps(reference, x, y, micro=2)  # one process, the whole global batch
        expected = reference.state_dict()

        # DDP: 2 ranks x 2 micro-steps x 2 samples = the same global batch of 8
        ddp_model = copy.deepcopy(model)
        ddp = D.wrap_model(ddp_model, info, "ddp")
        assert D.unwrap_model(ddp) is ddp_model
        train_steps(ddp_model, x, y, micro=2, wrapped=ddp, rank=rank, world=2)
        got = D.full_state_dict(ddp)
        assert list(got) == list(expected)  # no "module." prefixes
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)

        # FSDP2: blocks + root sharded; training equals the 1-process result
        fsdp_model = copy.deepcopy(model)
        D.wrap_model(fsdp_model, info, "fsdp", block_types=(Block,))
        assert any(hasattr(p, "full_tensor") for p in fsdp_model.parameters())  # really sharded
        opt = train_steps(fsdp_model, x, y, micro=2, rank=rank, world=2)
        full = D.full_state_dict(fsdp_model)
        if rank == 0:
            assert list(full) == list(expected)  # official keys, no FSDP prefixes
            assert all(v.device.type == "cpu" and not hasattr(v, "full_tensor") for v in full.values())
            for key in expected:
                torch.testing.assert_close(full[key], expected[key], rtol=1e-5, atol=1e-6)
        else:
            assert full == {}
        osd = D.full_optimizer_state_dict(fsdp_model, opt)
        if rank == 0:
            assert "blocks.0.lin.weight" in osd["state"]

        # clip_grad_norm over sharded (DTensor) and plain gradients together: one global norm, one factor
        nn.functional.mse_loss(fsdp_model(x[rank * 4:(rank + 1) * 4]), y[rank * 4:(rank + 1) * 4]).backward()
        extra = nn.Parameter(torch.zeros(2))
        extra.grad = torch.tensor([3.0, 4.0])
        params = [*fsdp_model.parameters(), extra]
        before = [D.full_tensor(p.grad).clone() for p in params]
        norm = D.clip_grad_norm(params, max_norm=0.5)
        expected_norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in before])))
        assert abs(norm - expected_norm) < 1e-5 * expected_norm, (norm, expected_norm)
        for p, g in zip(params, before):
            torch.testing.assert_close(D.full_tensor(p.grad), g * (0.5 / expected_norm), rtol=1e-5, atol=1e-7)
        fsdp_model.zero_grad(set_to_none=True)

        # load_full_state_dict round trip: every rank loads the same full dict
        fresh = {k: torch.full_like(v, 0.25) for k, v in expected.items()}
        D.load_full_state_dict(fsdp_model, fresh)
        again = D.full_state_dict(fsdp_model)
        if rank == 0:
            assert all(torch.equal(again[k], fresh[k]) for k in fresh)
        D.load_full_state_dict(ddp, fresh)
        assert torch.equal(ddp_model.out.weight, fresh["out.weight"])
        D.barrier()
        if rank == 0:
            Path(out).write_text("ok")
    finally:
        D.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_two_processes_gloo(tmp_path, clean_env):
    clean_env.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    out = tmp_path / "ok"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    assert out.read_text() == "ok"


def test_single_process_without_env_creates_no_group(clean_env):
    info = D.init_distributed(prefer_cuda=False)
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert not D.is_initialized()
    D.barrier()
    D.cleanup()
    t = torch.tensor([3.0])
    assert D.all_reduce_mean(t) is t and t.item() == 3.0 and D.broadcast_object(5) == 5
    model = Tiny()
    assert D.wrap_model(model, info, "fsdp") is model and D.wrap_model(model, info, "ddp") is model
    sd = D.full_state_dict(model)
    D.load_full_state_dict(model, {k: v + 1 for k, v in sd.items()})
    assert torch.equal(model.out.bias, sd["out.bias"] + 1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = D.full_optimizer_state_dict(model, opt)
    D.load_full_optimizer_state_dict(model, opt, state)
    with D.grad_sync(model, enabled=False):
        pass


def test_slurm_single_task_and_errors(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert D.init_distributed(prefer_cuda=False).world_size == 1 and not D.is_initialized()
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_JOB_NODELIST", "node[01-02]")
    clean_env.setenv("PATH", "/nonexistent")  # no scontrol on this machine either way
    with pytest.raises(UserError, match="MASTER_ADDR"):
        D.init_distributed(prefer_cuda=False)
    clean_env.setenv("SLURM_PROCID", "x")
    with pytest.raises(UserError, match="SLURM_PROCID='x' is not an integer"):
        D.init_distributed(prefer_cuda=False)


def test_slurm_derives_rendezvous(clean_env):
    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu-node7")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    assert D._launch_env() == (1, 1, 4, "slurm")
    assert os.environ["MASTER_ADDR"] == "gpu-node7" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
