"""Block offload (``offload_blocks: N``): the frozen weights of a network's blocks live in host memory
and are copied to the compute device ahead of use, a ring of N blocks at a time.

Why: the frozen base of a LoRA / ControlNet run (3.6B Stage C: 7 GB in bf16) is the largest thing on
a small card; with its blocks in host memory the device holds N blocks of it.

How (device-agnostic; nothing here names a network): :func:`offload_blocks_` replaces each frozen
parameter inside the given block modules (``requires_grad`` False; a LoRA's own parameters stay
where they are) by a :class:`HostWeight`: a tensor that reports the compute device and the weight's
shape and dtype but whose data is a host copy. An op that reads it gets a device copy (from the ring
when prefetched, else copied on the spot) that dies with the op; layout ops (``t``, ``transpose``,
``slice``, ``view``, ``detach``...) stay lazy, so what autograd saves for backward is the small
:class:`HostWeight`, not a device copy, and backward copies again. A forward pre-hook on block k
starts the copies of blocks k .. k+N-1 on a side stream (CUDA); a backward pre-hook does the same
for blocks k .. k-N+1; copies outside the ring are dropped. On the CPU the "copy" is the host tensor
itself, so a CPU run computes exactly what it computes without offload (bitwise; tested). A
quantised weight (modules/quantize.py) is offloaded as it is stored (its 8-bit codes travel).

Host copies: every host-resident tensor this module creates comes from ONE function,
:func:`host_copy` (pinned when CUDA is available, so copies can run asynchronously). For memory
accounting (the GPU-memory simulation counts device bytes only) the live host copies are known by
their storages: :func:`host_storage_keys` returns the ``untyped_storage()._cdata`` keys of every
live host copy (a weak registry: a copy leaves it when it dies), and :func:`is_host_resident` asks
for one tensor. Works on fake tensors (``FakeTensorMode``) too. Counting a parameter by its own
``untyped_storage()`` is wrong for the wrapper tensors of this project (a :class:`HostWeight` or a
``modules.quantize.QuantizedWeight`` reports a dense-sized storage it never allocates):
:func:`device_parts` gives the plain tensors whose storages hold a tensor's data on the device
(the 8-bit codes and scales of a quantised weight; nothing for a host-resident one).

Not combined with (refused by the config): ``use_fsdp`` (FSDP2 shards plain tensors), ``compile``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

from core.config import doc
from core.errors import UserError

__all__ = ["OffloadConfig", "HostWeight", "BlockOffload", "offload_blocks_", "host_copy", "is_host_resident",
           "host_storage_keys", "device_parts"]

aten = torch.ops.aten

# -- host copies: one constructor, one weak registry ----------------------------------------------
_HOST: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def host_copy(t: torch.Tensor, pin: Optional[bool] = None) -> torch.Tensor:
    """THE way a host-resident copy of ``t`` is made here: a CPU copy (its inner tensors for a
    quantised weight), pinned when ``pin`` (default: CUDA is available); registered for
    :func:`host_storage_keys`."""
    if pin is None:
        from torch._subclasses.fake_tensor import is_fake

        pin = torch.cuda.is_available() and not is_fake(t)  # a simulation's fake tensors have nothing to pin
    inner = getattr(type(t), "__tensor_flatten__", None)
    if inner is not None and not isinstance(t, HostWeight):  # e.g. QuantizedWeight: copy codes and scales
        names, meta = t.__tensor_flatten__()
        parts = {n: host_copy(getattr(t, n), pin) for n in names}
        return type(t).__tensor_unflatten__(parts, meta, t.shape, t.stride())
    out = t.detach().to("cpu", copy=True)
    if pin:
        out = out.pin_memory()
    _HOST[out.untyped_storage()._cdata] = out
    return out


def host_storage_keys() -> set[int]:
    """``untyped_storage()._cdata`` of every live host copy made by :func:`host_copy`."""
    return set(_HOST.keys())


def is_host_resident(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage is a live host copy of :func:`host_copy` (a :class:`HostWeight`
    counts as host-resident as a whole)."""
    if isinstance(t, HostWeight):
        return True
    return t.untyped_storage()._cdata in _HOST


# -- the lazily fetched weight --------------------------------------------------------------------
_LAYOUT_OPS = {aten.detach.default, aten.t.default, aten.transpose.int, aten.slice.Tensor, aten.view.default,
               aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.expand.default,
               aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim}


class HostWeight(torch.Tensor):
    """A frozen weight whose data is a host copy; it reports ``device`` (the compute device), and
    the shape and dtype of ``host`` after the recorded layout ops ``views``."""

    host: torch.Tensor

    @staticmethod
    def __new__(cls, host: torch.Tensor, device: torch.device, ring: "BlockOffload", views: tuple = (),
                shape: Optional[torch.Size] = None) -> "HostWeight":
        return torch.Tensor._make_wrapper_subclass(cls, shape if shape is not None else host.shape, dtype=host.dtype,
                                                   device=device, requires_grad=False)

    def __init__(self, host: torch.Tensor, device: torch.device, ring: "BlockOffload", views: tuple = (),
                 shape: Optional[torch.Size] = None) -> None:
        self.host, self.compute_device, self.ring, self.views = host, torch.device(device), ring, views

    def __repr__(self) -> str:  # type: ignore[override]
        return f"HostWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.compute_device})"

    def fetch(self) -> torch.Tensor:
        """The weight on the compute device (from the ring if prefetched), layout ops applied."""
        t = self.ring.device_copy(self.host, self.compute_device)
        for func, rest, kwargs in self.views:
            t = func(t, *rest, **kwargs)
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if args and isinstance(args[0], HostWeight) and func._schema.is_mutable:
            # Changing the fetched temporary would be lost without a word.
            raise RuntimeError(f"a HostWeight is read-only ({func.__name__}); offload after changing weights")
        if func in _LAYOUT_OPS and args and isinstance(args[0], HostWeight) and not any(
                isinstance(a, HostWeight) for a in args[1:]):
            self = args[0]
            shape = func(torch.empty(self.shape, dtype=self.dtype, device="meta"), *args[1:], **kwargs).shape
            return HostWeight(self.host, self.compute_device, self.ring, self.views + ((func, args[1:], kwargs),), shape)

        def dense(t: Any) -> Any:
            return t.fetch() if isinstance(t, HostWeight) else t

        return func(*tree_map(dense, args), **tree_map(dense, kwargs))


# -- the ring of resident blocks ------------------------------------------------------------------
class BlockOffload:
    """Prefetches the host weights of ``ring`` consecutive blocks onto the compute device (hooks on
    the blocks; see the module docstring)."""

    def __init__(self, blocks: Sequence[nn.Module], ring: int, device: torch.device) -> None:
        self.blocks, self.ring, self.device = list(blocks), max(int(ring), 1), torch.device(device)
        self.hosts: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.resident: dict[int, tuple[dict[int, torch.Tensor], Any]] = {}  # block -> ({id(host): copy}, event)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.handles: list[Any] = []
        self.misses = 0          # weights copied on the spot (not prefetched)
        self.peak_resident = 0   # most blocks resident at once (<= ring)

    def attach(self) -> None:
        for k, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda _m, _a, k=k: self.prefetch(k, _direction())))
            self.handles.append(block.register_forward_hook(lambda _m, _a, out, k=k: self._on_output(out, k)))

    def _on_output(self, out: Any, k: int) -> None:
        # The gradient of block k's output arrives just before its backward: prefetch backwards from k.
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda _grad: self.prefetch(k, -1))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.resident = [], {}

    def prefetch(self, k: int, direction: int) -> None:
        """Make blocks k, k+d, ..., k+(ring-1)d resident (d = ``direction``); drop the others."""
        wanted = [j for j in (k + i * direction for i in range(self.ring)) if 0 <= j < len(self.blocks)]
        for j in list(self.resident):
            if j not in wanted:
                del self.resident[j]
        for j in wanted:
            if j not in self.resident:
                self.resident[j] = self._copy_block(j)
        self.peak_resident = max(self.peak_resident, len(self.resident))

    def _copy_block(self, j: int) -> tuple[dict[int, torch.Tensor], Any]:
        """Start the copies of block ``j`` on the side stream: ``({id(host): copy}, done event)``."""
        if self.device.type == "cpu":
            if _simulating():  # core/memsim.py: the copies a GPU would hold, as device bytes
                return {id(host): host.clone() for host in self.hosts[j]}, None
            return {}, None  # the host tensor is the device tensor: nothing to copy
        with torch.cuda.stream(self.stream):
            copies = {id(host): host.to(self.device, non_blocking=True) for host in self.hosts[j]}
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def device_copy(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``host`` on ``device``: the ring's copy once its block's copies are done, else a copy now."""
        if device.type == "cpu" and not _simulating():
            return host
        if device.type == "cpu":  # a GPU-memory simulation: the ring's copy, else a copy now
            for copies, _event in self.resident.values():
                if id(host) in copies:
                    return copies[id(host)]
            self.misses += 1
            return host.clone()
        for copies, event in self.resident.values():
            copy = copies.get(id(host))
            if copy is not None:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(event)
                for t in _plain_parts(copy):
                    t.record_stream(stream)  # allocated on the side stream, used (and maybe freed) here
                return copy
        self.misses += 1
        return host.to(device, non_blocking=True)


def _simulating() -> bool:
    """Whether a GPU-memory simulation (core/memsim.py) runs: the CPU then makes the device copies
    a GPU run makes, so they are counted (host copies are excluded through :func:`host_storage_keys`)."""
    from core.memsim import active_counter

    return active_counter() is not None


def _direction() -> int:
    """+1 in a forward, -1 in a forward that backward runs (gradient checkpointing's recompute):
    there the next blocks to run are the earlier ones."""
    return -1 if torch._C._current_graph_task_id() != -1 else +1


def _plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data (the inner tensors of a wrapper subclass)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    return [part for name in flatten()[0] for part in _plain_parts(getattr(t, name))]


def device_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors whose storages hold ``t``'s data in device memory, for memory accounting:
    none for a :class:`HostWeight` or a host copy, the inner tensors of a wrapper subclass such as
    a quantised weight (codes, scales), else ``[t]``."""
    if isinstance(t, HostWeight):
        return []
    return [p for p in _plain_parts(t) if not is_host_resident(p)]


def offload_blocks_(blocks: Sequence[nn.Module], ring: int, device: torch.device) -> BlockOffload:
    """Move the frozen parameters of ``blocks`` (registration order = the order they run) to host
    memory as :class:`HostWeight` s fetched through a ring of ``ring`` blocks; returns the attached
    :class:`BlockOffload`. Call after every ``.to(device)`` of the network (a move would fetch them)."""
    offload = BlockOffload(blocks, ring, device)
    for k, block in enumerate(offload.blocks):
        for module in block.modules():
            for name, p in list(module._parameters.items()):
                if p is None or p.requires_grad or isinstance(p, HostWeight):
                    continue
                host = host_copy(p.detach())
                offload.hosts[k].append(host)
                module._parameters[name] = nn.Parameter(HostWeight(host, device, offload), requires_grad=False)
    offload.attach()
    return offload


@dataclass
class OffloadConfig:
    """Keys of block offload (this module)."""

    offload_blocks: int = doc(
        0, "Keep the frozen weights of the U-Net blocks (the frozen Stage C under a LoRA/DoRA/ControlNet) in host "
           "memory (pinned on CUDA) and copy them to the GPU ahead of use, this many blocks at a time (a ring, "
           "prefetched on a side stream in forward and backward); trained parameters (a LoRA's) stay on the GPU. "
           "0 = off. Slower (PCIe bandwidth), much less GPU memory. Not with use_fsdp or compile.")

    def validate_offload(self) -> None:
        if self.offload_blocks < 0:
            raise UserError(f"config key 'offload_blocks' must be >= 0 (0 = off), got {self.offload_blocks}")
        if self.offload_blocks and getattr(self, "use_fsdp", False):
            raise UserError("config key 'offload_blocks' does not combine with use_fsdp: true (FSDP shards plain "
                            "tensors); set one of them off")
        if self.offload_blocks and getattr(self, "compile", False):
            raise UserError("config key 'offload_blocks' does not combine with compile: true (the offloaded "
                            "weights are fetched by Python code the compiler cannot trace); set one of them off")
