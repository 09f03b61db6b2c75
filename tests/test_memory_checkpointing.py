"""Gradient checkpointing on CPU: identical gradients, lower peak memory (issue 8 acceptance).

Peak memory is measured, not estimated: a dispatch mode sees every tensor an op creates during
forward + backward, and a weakref finalizer on its storage says when the allocator gets it back
(storages keep one Python object per allocation, so this tracks the real lifetime, including
tensors only autograd still holds). Pre-existing parameters and inputs are excluded.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from modules.registry import build_model


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created under the mode that are still alive; keeps the peak."""

    def __init__(self, preexisting: list[torch.Tensor]):
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in preexisting}
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                key = s._cdata
                if key in self.known or key in self.live:
                    continue
                self.live[key] = s.nbytes()
                self.current += s.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(s, self._free, key)
        return out


def _model_and_inputs(kind: str):
    torch.manual_seed(0)
    model = build_model(kind, "tiny")
    with torch.no_grad():  # fresh init zeroes some layers (clf, TimestepBlocks): make every path live
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    b = 2
    if kind == "stage_c":
        inputs = (torch.randn(b, 16, 16, 16), torch.rand(b))
        kw = {"clip_text": torch.randn(b, 77, 32), "clip_text_pooled": torch.randn(b, 1, 32),
              "clip_img": torch.randn(b, 1, 24)}
    else:
        inputs = (torch.randn(b, 4, 32, 32), torch.rand(b))
        kw = {"effnet": torch.randn(b, 16, 4, 4), "clip": torch.randn(b, 1, 32)}
    return model.train(), inputs, kw


def _step(model, inputs, kw, checkpointing: bool):
    model.set_gradient_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    tracker = LiveBytes(list(model.parameters()) + list(inputs) + list(kw.values()))
    torch.manual_seed(1)  # dropout masks: checkpoint replays the RNG state on recomputation
    with tracker:
        loss = model(*inputs, **kw).pow(2).mean()
        loss.backward()
        del loss
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, tracker.peak


@pytest.mark.parametrize("kind", ["stage_c", "stage_b"])
def test_checkpointing_same_gradients_lower_peak(kind):
    model, inputs, kw = _model_and_inputs(kind)
    g_plain, peak_plain = _step(model, inputs, kw, False)
    g_ckpt, peak_ckpt = _step(model, inputs, kw, True)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 10
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-6, msg=name)
    print(f"{kind}: peak without checkpointing {peak_plain / 2**20:.1f} MiB, with {peak_ckpt / 2**20:.1f} MiB")
    assert peak_ckpt < 0.8 * peak_plain


def test_controlnet_checkpointing_same_gradients():
    from modules.controlnet import ControlNet

    torch.manual_seed(0)
    cnet = ControlNet(c_in=4, c_proj=32, proj_blocks=[0, 2], bottleneck_mode="simple")
    with torch.no_grad():
        for p in cnet.parameters():
            p.normal_(0.0, 0.05)
    x = torch.randn(2, 4, 32, 32)
    grads = []
    for on in (False, True):
        cnet.set_gradient_checkpointing(on)
        cnet.zero_grad(set_to_none=True)
        sum(o.pow(2).mean() for o in cnet(x) if o is not None).backward()
        grads.append({n: p.grad.clone() for n, p in cnet.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
