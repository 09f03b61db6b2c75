"""offload_blocks (core/offload.py): host-resident frozen block weights behind a ring give the same
losses and gradients as without (bitwise on the CPU), autograd keeps no device copy, the host
registry the memory simulation reads, refused combinations."""
from __future__ import annotations

import pytest
import torch

from tests.test_modules_stage_bc import _c_inputs, _randomise


def _lora_step(offload: int, quant: bool, checkpointing: bool):
    from core.offload import HostWeight, offload_blocks_
    from modules.quantize import quantize_frozen_
    from modules.common import BLOCK_TYPES
    from modules.lora import apply_lora
    from modules.registry import build_model

    torch.manual_seed(0)
    model = _randomise(build_model("stage_c", "tiny")).train().requires_grad_(False)
    if quant:
        quantize_frozen_(model, "int8")
    torch.manual_seed(1)
    loras = apply_lora(model, [".attn"], rank=2)
    model.set_gradient_checkpointing(checkpointing)
    if offload:
        blocks = [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
        offload_blocks_(blocks, offload, torch.device("cpu"))
        assert all(isinstance(p, HostWeight) for b in blocks for p in b.parameters() if not p.requires_grad)
        assert all(not isinstance(p, HostWeight) for _, lora in loras for p in lora.parameters())
    torch.manual_seed(123)  # dropout masks replay identically
    loss = model(**_c_inputs()).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for _, lora in loras for p in lora.parameters()]


@pytest.mark.parametrize("quant, checkpointing", [(False, False), (True, True)])
def test_same_loss_and_gradients_bitwise(quant, checkpointing):
    plain, offloaded = _lora_step(0, quant, checkpointing), _lora_step(2, quant, checkpointing)
    assert torch.equal(plain[0], offloaded[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], offloaded[1]))


def test_host_copies_are_registered_and_autograd_keeps_the_host_weight():
    from core.offload import BlockOffload, HostWeight, host_copy, host_storage_keys, is_host_resident

    w = torch.randn(8, 4)
    host = host_copy(w)
    assert torch.equal(host, w) and is_host_resident(host) and not is_host_resident(w)
    assert host.untyped_storage()._cdata in host_storage_keys()
    weight = torch.nn.Parameter(HostWeight(host, torch.device("cpu"), BlockOffload([], 1, torch.device("cpu"))),
                                requires_grad=False)
    x = torch.randn(3, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y = torch.nn.functional.linear(x, weight)
    assert saved and all(isinstance(t, HostWeight) for t in saved) and torch.equal(y, x @ w.t())
    key = host.untyped_storage()._cdata
    del host, weight, saved, y
    assert key not in host_storage_keys()  # a weak registry: dead copies leave it


@pytest.mark.parametrize("sets, match", [(["offload_blocks=-1"], "offload_blocks"),
                                         (["offload_blocks=2", "use_fsdp=true"], "use_fsdp"),
                                         (["offload_blocks=2", "compile=true"], "compile")])
def test_refused_settings(sets, match):
    from core.config import load_config
    from core.errors import UserError
    from train.train_c_lora import LoraConfig

    base = ["checkpoint_path=/tmp/x", "output_path=/tmp/x"]
    with pytest.raises(UserError, match=match):
        load_config(LoraConfig, "configs/training/tiny_c_lora.yaml", base + sets, validate_only=True)


def test_the_ring_follows_forward_and_backward():
    from core.offload import offload_blocks_

    blocks = [torch.nn.Linear(4, 4).requires_grad_(False) for _ in range(5)]
    ring = offload_blocks_(blocks, 2, torch.device("cpu"))
    x = torch.randn(3, 4, requires_grad=True)
    windows = []
    for k, block in enumerate(blocks):
        x = block(x)
        windows.append(sorted(ring.resident))
    assert windows == [[0, 1], [1, 2], [2, 3], [3, 4], [4]]
    x.sum().backward()  # each block's output gradient prefetches backwards from it
    assert sorted(ring.resident) == [0] and ring.peak_resident == 2


def test_device_parts_for_memory_accounting():
    from core.offload import BlockOffload, HostWeight, device_parts, host_copy
    from modules.quantize import quantize_weight

    w = torch.randn(64, 64)
    q = quantize_weight(w, "int8")
    assert [t.dtype for t in device_parts(q)] == [torch.int8, torch.float32]  # codes, scales
    assert device_parts(w) == [w] and device_parts(host_copy(w)) == []
    assert device_parts(HostWeight(host_copy(w), torch.device("cpu"), BlockOffload([], 1, torch.device("cpu")))) == []
