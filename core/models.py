"""The networks a job registered: which train, which stay frozen, and what the core does to them.

Frozen networks go to eval mode, ``requires_grad_(False)``, the frozen dtype and the device.
Trained networks get their trainable parameters marked, the ``generator_dropout`` override,
gradient checkpointing, the device, train mode, then ``compile`` and the DDP/FSDP wrapper of
core/distributed.py. Under FSDP, frozen networks registered with ``shard=True`` are sharded the
same way (per block, then the root; no wrapper under DDP or one process): a large frozen base
then costs each rank 1/world of its weights. The networks stay attributes of the job (wrapping
replaces the attribute).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from core import distributed as D
from core.precision import cast_frozen

__all__ = ["ModelSet"]

log = logging.getLogger(__name__)


@dataclass
class _Trained:
    params: Optional[list[nn.Parameter]]  # None: every parameter trains
    save_as: Optional[str]
    wrap: bool


class ModelSet:
    """Registered networks of ``owner`` (the job object holding them as attributes)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.trained: dict[str, _Trained] = {}
        self.frozen: dict[str, bool] = {}  # name -> cast to the frozen dtype
        self.sharded_frozen: list[str] = []  # frozen networks FSDP shards (registered with shard=True)

    def add_trained(self, name: str, module: nn.Module, params: Optional[list[nn.Parameter]],
                    save_as: Optional[str], wrap: bool) -> nn.Module:
        if name in self.trained or name in self.frozen:
            raise ValueError(f"module {name!r} is registered twice")
        self.trained[name] = _Trained(params, save_as, wrap)
        setattr(self.owner, name, module)
        return module

    def add_frozen(self, name: str, module: nn.Module, dtype: Optional[torch.dtype], device: torch.device,
                   shard: bool = False, quantize: bool = False) -> nn.Module:
        """Freeze now (eval, no grad, ``dtype`` unless None, the owner's config's ``base_dtype`` if
        ``quantize``, device), so trained parts a job adds inside it later (e.g. token rows) keep their
        own dtype. ``shard``: FSDP shards it in :meth:`wrap` (it must then be called the same number
        of times on every rank)."""
        if name in self.trained or name in self.frozen:
            raise ValueError(f"module {name!r} is registered twice")
        self.frozen[name] = dtype is not None
        if shard:
            self.sharded_frozen.append(name)
        module.eval().requires_grad_(False)
        if dtype is not None:
            cast_frozen(module, dtype)
        if quantize:  # after the cast (it sets the compute dtype), before the move (host memory)
            from core.quantize import quantize_as_configured

            quantize_as_configured(module, self.owner.cfg)
        setattr(self.owner, name, module.to(device))
        return module

    def get(self, name: str) -> nn.Module:
        return getattr(self.owner, name)

    def first_trained(self) -> str:
        """The network EMA and previews follow: the first trained one with a file, else the first."""
        return next((n for n, t in self.trained.items() if t.save_as), next(iter(self.trained)))

    def prepare(self, cfg: Any, device: torch.device) -> None:
        """Apply the trained set-up (see the module docstring) before wrapping; frozen networks
        are (again) in eval mode without gradients, except trained parts registered inside them."""
        for name in self.frozen:
            self.get(name).eval().requires_grad_(False)
        for name, t in self.trained.items():
            module = self.get(name)
            if t.params is not None:
                module.requires_grad_(False)
                for p in t.params:
                    p.requires_grad_(True)
            if cfg.generator_dropout is not None:
                for m in module.modules():
                    if isinstance(m, nn.Dropout):
                        m.p = float(cfg.generator_dropout)
                    elif isinstance(m, nn.MultiheadAttention):  # attention-weight dropout is a float
                        m.dropout = float(cfg.generator_dropout)
            if cfg.gradient_checkpointing and hasattr(module, "set_gradient_checkpointing"):
                module.set_gradient_checkpointing(cfg.gradient_checkpointing)  # True or a block period N
            module.to(device).train()
        unregistered = [k for k, v in vars(self.owner).items() if isinstance(v, nn.Module)
                        and k not in self.trained and k not in self.frozen]
        if unregistered:  # the core would leave them in train mode with gradients: a silent defect
            raise RuntimeError(f"{type(self.owner).__name__} built modules it did not register: {unregistered}")

    def wrap(self, cfg: Any, dist: D.DistInfo, block_types: tuple[type, ...],
             autocast_dtype: Optional[torch.dtype]) -> None:
        """``compile`` (in place: official keys kept) and DDP / FSDP2 for every wrapped trained
        network; under FSDP also the frozen networks registered with ``shard=True``."""
        mode = "none"
        if dist.world_size > 1:
            mode = "fsdp" if cfg.use_fsdp else "ddp"
        elif cfg.use_fsdp:
            log.info("use_fsdp is set but there is one process: training without sharding")
        if mode == "fsdp":
            for name in self.sharded_frozen:
                # No mixed-precision cast: a frozen network computes in the dtype it is stored in
                # (frozen_dtype), as it does unsharded; it has no gradients to reduce.
                setattr(self.owner, name, D.wrap_model(self.get(name), dist, mode, block_types=block_types))
        for name, t in self.trained.items():
            if not t.wrap:
                continue
            module = self.get(name)
            if cfg.compile:
                module.compile()
            setattr(self.owner, name, D.wrap_model(
                module, dist, mode, block_types=block_types, param_dtype=autocast_dtype,
                reduce_dtype=torch.float32 if autocast_dtype else None))

    def offload(self, cfg: Any, block_types: tuple[type, ...], device: torch.device) -> list[Any]:
        """``offload_blocks: N`` (0: nothing): the frozen parameters inside the ``block_types`` blocks
        of every registered network go to host memory behind a ring of N blocks (core/offload.py);
        trained parameters stay. After :meth:`wrap` (a later move would fetch them back)."""
        from core.offload import offload_blocks_

        ring = int(getattr(cfg, "offload_blocks", 0) or 0)
        rings: list[Any] = []
        if not ring:
            return rings
        for name in list(self.trained) + list(self.frozen):
            module = D.unwrap_model(self.get(name))
            blocks = [m for m in module.modules() if isinstance(m, block_types)]
            if any(not p.requires_grad for b in blocks for p in b.parameters()):
                rings.append(offload_blocks_(blocks, ring, device))
                log.info("%s: frozen weights of %d blocks offloaded to host memory (ring of %d)", name, len(blocks), ring)
        return rings

    def networks(self) -> list[nn.Module]:
        """The trained networks as the job holds them now (wrapped after ``wrap``)."""
        return [self.get(n) for n in self.trained]

    def wrapped(self) -> list[nn.Module]:
        return [self.get(n) for n, t in self.trained.items() if t.wrap]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The trained networks' parameters that require grad, in registration/module order."""
        seen: set[int] = set()
        out = []
        for name in self.trained:
            for p in self.get(name).parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def unwrapped_trainable(self) -> list[nn.Parameter]:
        """Trainable parameters no wrapper reduces (their gradients are averaged by the core)."""
        return [p for n, t in self.trained.items() if not t.wrap for p in self.get(n).parameters() if p.requires_grad]
