"""core/memsim.py: the CPU takes a CUDA GPU's decisions (op by op equal to a forward on fake CUDA
tensors), and the simulated peak on fake tensors equals the peak counted on real tensors."""
from __future__ import annotations

import contextlib
from typing import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from core import memsim

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# fake CUDA tensors without a GPU (forward only, no autograd: the engine needs a device)
# ------------------------------------------------------------------------------------------------
class _CudaBasicIndexing(TorchFunctionMode):
    """``t[:, None]`` on a fake CUDA tensor without ``Tensor.__getitem__``'s CUDA device guard
    (which initialises CUDA): basic indexing rewritten as views."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and args[0].device.type == "cuda":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if all(i is None or isinstance(i, (int, slice)) for i in index):
                t, dim = args[0], 0
                for i in index:
                    if i is None:
                        t, dim = t.unsqueeze(dim), dim + 1
                    elif isinstance(i, int):
                        t = t.select(dim, i)
                    else:
                        if i != slice(None):
                            t = torch.ops.aten.slice(t, dim, i.start, i.stop, i.step or 1)
                        dim += 1
                return t
        return func(*args, **(kwargs or {}))


class _OpLog(TorchDispatchMode):
    """(op, input dtypes/shapes, output dtypes/shapes) of every operation."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not str(func).startswith("prim."):
            sig = lambda x: [(t.dtype, tuple(t.shape)) for t in tree_leaves(x) if isinstance(t, torch.Tensor)]  # noqa: E731
            name = str(func)
            outs = sig(out)
            if "scaled_dot_product_flash_attention" in name:
                # the CUDA kernel (GPU) and the CPU one (simulation): same output and log-sum-exp
                name, outs = "flash attention", outs[:2]
            self.ops.append((name, sig((args, kwargs)), outs))
        return out


def _materialize(module: nn.Module, device: str) -> nn.Module:
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is not None:
                    x = torch.empty(t.shape, dtype=t.dtype, device=device)
                    table[k] = nn.Parameter(x, requires_grad=False) if isinstance(t, nn.Parameter) else x
    return module


def _stage_c_forward(device: str) -> list[tuple]:
    """The ops of a tiny Stage C training forward (train mode: dropout on) under bf16 autocast,
    fp32 weights, on fake ``device`` tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from modules.registry import build_model, model_config

    with FakeTensorMode():
        model = _materialize(build_model("stage_c", "tiny", device="meta"), device).train()
        kw = model_config("stage_c", "tiny")
        x = torch.empty(2, kw.get("c_in", 16), 8, 8, device=device)
        cond = {"clip_text": torch.empty(2, 77, kw["c_clip_text"], device=device),
                "clip_text_pooled": torch.empty(2, 1, kw["c_clip_text_pooled"], device=device),
                "clip_img": torch.empty(2, 1, kw["c_clip_img"], device=device)}
        log = _OpLog()
        with torch.no_grad(), _CudaBasicIndexing(), log, torch.autocast(device, dtype=torch.bfloat16):
            pred = model(x, torch.rand(2, device=device), **cond)
            (pred.float() - x).pow(2).mean()
    return log.ops


@contextlib.contextmanager
def _fake_cuda_with_h100_attention():
    """Fake CUDA tensors, and SDPA's choice an H100 makes for bf16, head dim <= 256, no mask (the
    flash kernel; without a GPU the choice cannot read the device and falls back to math)."""
    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert attn_mask is None and q.dtype == torch.bfloat16 and q.shape[-1] <= 256
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]

    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901
    try:
        with mock.patch("torch.cuda.is_available", lambda: True), \
                mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True):
            lib.impl("scaled_dot_product_attention", flash, "CompositeImplicitAutograd")
            yield
    finally:
        lib._destroy()


def test_cpu_forward_takes_the_gpu_decisions_op_by_op():
    with _fake_cuda_with_h100_attention():
        cuda = _stage_c_forward("cuda")
    with memsim.gpu_decisions():
        cpu = _stage_c_forward("cpu")
    assert len(cpu) == len(cuda) > 500
    for i, (got, want) in enumerate(zip(cpu, cuda)):
        assert got == want, f"op {i}: CPU {got} != CUDA {want}"
    # the plain CPU autocast differs (layer norm in bf16 ...): the emulation is what makes them equal
    plain = _stage_c_forward("cpu")
    assert plain != cuda
    assert any(op[0] == "aten.native_layer_norm.default" and op[2][0][0] == torch.float32 for op in cpu)


def test_gpu_decisions_are_undone():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with memsim.gpu_decisions(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.float32          # CUDA: fp32 list
        assert torch.softmax(x, -1).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16         # the CPU's own lists again
    p = [nn.Parameter(torch.zeros(3))]
    from torch.optim.adam import _default_to_fused_or_foreach
    assert _default_to_fused_or_foreach(p, False) == (False, False)


# ------------------------------------------------------------------------------------------------
# counting
# ------------------------------------------------------------------------------------------------
def test_counting_follows_storages():
    counter = memsim.LiveMemory(fake=False)
    with counter:
        a = torch.empty(1000)                       # 4000 bytes -> 4096 (512-byte blocks)
        assert counter.current == 4096
        v = a[10:]                                  # a view: same storage
        assert counter.current == 4096
        del a
        assert counter.current == 4096              # the view keeps it alive
        del v
        assert counter.current == 0
        b = torch.empty(3)
        memsim.LiveMemory.exclude(counter, b)       # host memory (block offload) is not counted
        assert counter.current == 0
        c = torch.ones(7, dtype=torch.bfloat16) * 2
        assert counter.current == 512 and counter.peak.bytes == 4096
        del b, c


def _tiny_job(optimizer: str) -> Callable[[], memsim.SimJob]:
    """A tiny Stage C trained in float32 under bf16 autocast with ``optimizer`` (foreach on the GPU)."""
    from modules.registry import build_model, model_config

    def build() -> memsim.SimJob:
        torch.manual_seed(0)
        model = build_model("stage_c", "tiny").train()
        model.set_gradient_checkpointing(False)
        params = list(model.parameters())
        opt = (torch.optim.AdamW(params, lr=1e-4) if optimizer == "adamw"
               else torch.optim.Adafactor(params, lr=1e-4))
        kw = model_config("stage_c", "tiny")

        def step(phases: memsim.Phases) -> None:
            x = torch.randn(2, kw.get("c_in", 16), 8, 8)
            cond = {"clip_text": torch.randn(2, 77, kw["c_clip_text"]),
                    "clip_text_pooled": torch.randn(2, 1, kw["c_clip_text_pooled"]),
                    "clip_img": torch.randn(2, 1, kw["c_clip_img"])}
            phases("forward")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = model(x, torch.rand(2), **cond)
            loss = (pred.float() - x).pow(2).mean()
            phases("backward")
            loss.backward()
            del loss, pred
            phases("clip")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            phases("optimizer")
            opt.step()
            opt.zero_grad(set_to_none=True)

        return memsim.SimJob(modules=[model], params=params, optimizer=opt, step=step,
                             warmup=memsim.optimizer_warmup(opt, params))
    return build


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_simulated_peak_equals_the_real_peak(optimizer):
    fake = memsim.simulate(_tiny_job(optimizer), fake=True)
    real = memsim.simulate(_tiny_job(optimizer), fake=False)
    assert fake.peak_bytes == real.peak_bytes > 0
    assert fake.phase_peaks == real.phase_peaks
    assert fake.breakdown == real.breakdown
    assert fake.breakdown["weights"] > 0 and fake.resident_bytes["optimizer states"] > 0
    if optimizer == "adamw":  # float32 weights: gradients as big as the weights at the optimizer step
        assert fake.phase_peaks["optimizer"] >= fake.breakdown["weights"] + fake.resident_bytes["optimizer states"]


def test_simulate_needs_dry_run():
    from core.cli import main
    from core.errors import UserError
    from train.train_c_lora import StageCLoraTrainer

    with pytest.raises(UserError, match="--simulate needs --dry-run"):
        main(StageCLoraTrainer, ["configs/training/tiny_c_lora.yaml", "--simulate"])
