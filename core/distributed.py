"""Launch detection (single process / torchrun / slurm), collectives, DDP / FSDP2 wrapping and
full (unsharded, un-prefixed) state dicts.

A plain ``python3 train/...`` with no launcher variables runs as ONE process and creates no
process group; every collective here is then a no-op (the reference needed slurm variables even on
one GPU and crashed on its unconditional barrier).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from core.errors import UserError

__all__ = [
    "DistInfo", "init_distributed", "barrier", "all_reduce_mean", "broadcast_object", "cleanup",
    "wrap_model", "unwrap_model", "grad_sync", "full_state_dict", "load_full_state_dict",
    "full_optimizer_state_dict", "load_full_optimizer_state_dict", "is_initialized", "is_sharded",
    "full_tensor", "any_rank", "global_mean", "all_gather_cat", "all_gather_object", "average_gradients",
    "world_size_from_env", "get_world_size", "clip_grad_norm",
]

log = logging.getLogger(__name__)

WrapMode = Literal["auto", "none", "ddp", "fsdp"]


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: single process, no process group
    is_main: bool = True


def is_initialized() -> bool:
    """Whether a process group exists (False for single-process runs)."""
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (check the launcher)") from None


def _slurm_master_addr() -> str:
    """First host of SLURM_JOB_NODELIST (expanded with ``scontrol show hostnames``)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("slurm launch without MASTER_ADDR and without SLURM_JOB_NODELIST; "
                        "export MASTER_ADDR=<first node> in the sbatch script")
    if "[" not in nodelist and "," not in nodelist:
        return nodelist  # a single plain host name needs no expansion
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise UserError(f"cannot derive MASTER_ADDR from SLURM_JOB_NODELIST={nodelist} (scontrol not found); "
                        "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) in the sbatch script")
    out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise UserError(f"'scontrol show hostnames {nodelist}' failed ({out.stderr.strip() or 'no hosts'}); "
                        "export MASTER_ADDR in the sbatch script")
    return hosts[0]


def _launch_env() -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, launcher) from torchrun or slurm variables; (0, 0, 1,
    'none') when there are none. Sets MASTER_ADDR/MASTER_PORT for slurm when missing."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        return rank, local, world, "torchrun"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        if world > 1:
            if not os.environ.get("MASTER_ADDR"):  # look the node list up only when needed
                os.environ["MASTER_ADDR"] = _slurm_master_addr()
            if "MASTER_PORT" not in os.environ:
                # One port per job, so two jobs sharing a node do not collide.
                job = os.environ.get("SLURM_JOB_ID", "0")
                os.environ["MASTER_PORT"] = str(20000 + (int(job) % 20000 if job.isdigit() else 0))
        return rank, local, world, "slurm"
    return 0, 0, 1, "none"


_INFO = DistInfo()


def init_distributed(prefer_cuda: bool = True, timeout_s: float = 1800.0) -> DistInfo:
    """Detect the launcher, pick the device and (only when world_size > 1) create the process
    group: NCCL on CUDA, gloo on CPU. Sets the CUDA device from local_rank."""
    global _INFO
    rank, local_rank, world_size, launcher = _launch_env()
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"invalid launch: rank {rank} with world size {world_size} ({launcher} variables)")
    use_cuda = prefer_cuda and torch.cuda.is_available()
    if use_cuda:
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    backend: Optional[str] = None
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise UserError(f"{launcher} launch with {world_size} processes but {name} is not set")
        backend = "nccl" if use_cuda else "gloo"
        if not is_initialized():
            kwargs: dict[str, Any] = {}
            if use_cuda:
                kwargs["device_id"] = device  # binds NCCL to this rank's GPU up front
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        log.info("distributed: %s rank %d/%d (local %d) on %s via %s", launcher, rank, world_size,
                 local_rank, device, backend)
    _INFO = DistInfo(rank, local_rank, world_size, device, backend, rank == 0)
    return _INFO


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place and return it (identity for one process). With
    NCCL the tensor must live on this rank's GPU."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) ``obj`` on every rank (identity for one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def get_world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def world_size_from_env() -> int:
    """The world size a launcher announced (torchrun's ``WORLD_SIZE``, else slurm's
    ``SLURM_NTASKS``; 1 without either), without initialising anything. What ``--validate-only``,
    ``--dry-run`` and the run check the batch split against; a value that is not a positive
    integer is a :class:`UserError` naming the variable."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").strip():
            value = _env_int(var)
            if value < 1:
                raise UserError(f"environment variable {var}={value} must be >= 1 (check the launcher)")
            return value
    return 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank (every rank must call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def global_mean(value: float, device: torch.device) -> float:
    """Mean of a per-rank number over all ranks (``value`` itself for one process)."""
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


_GATHER_MAX_DIMS = 8


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order (``t`` for one process). The
    ranks may hold different numbers of rows (dim 0); the other dimensions must agree (ValueError
    on every rank otherwise), and so must the dtype."""
    if not is_initialized():
        return t
    if t.dim() == 0 or t.dim() > _GATHER_MAX_DIMS:
        raise ValueError(f"all_gather_cat: expected a tensor with 1 to {_GATHER_MAX_DIMS} dimensions, "
                         f"got shape {tuple(t.shape)}")
    world = dist.get_world_size()
    # Shapes first (collectives need equal sizes): each rank pads its rows to the longest, and
    # the padding is cut off after the gather.
    header = torch.zeros(_GATHER_MAX_DIMS + 1, dtype=torch.int64, device=t.device)
    header[0] = t.dim()
    header[1:t.dim() + 1] = torch.tensor(t.shape, dtype=torch.int64)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header)
    shapes = [tuple(h[1:int(h[0]) + 1].tolist()) for h in headers]
    if any(s[1:] != shapes[0][1:] or len(s) != len(shapes[0]) for s in shapes):
        raise ValueError(f"all_gather_cat: the ranks' tensors differ beyond dim 0: shapes {shapes}")
    rows = [s[0] for s in shapes]
    longest = max(rows)
    src = t.contiguous()
    if src.shape[0] < longest:
        pad = src.new_zeros((longest - src.shape[0], *src.shape[1:]))
        src = torch.cat([src, pad])
    out = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(out, src)
    return torch.cat([o[:n] for o, n in zip(out, rows)])


def all_gather_object(obj: Any) -> list:
    """Every rank's (picklable) ``obj`` in rank order (``[obj]`` for one process)."""
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of parameters that no DDP/FSDP wrapper reduces (e.g. trained rows
    inside a frozen module); a missing gradient counts as zeros so every rank joins."""
    if not is_initialized():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def cleanup() -> None:
    """Destroy the process group if there is one."""
    if is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- wrapping
def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_model(model: nn.Module, info: DistInfo, mode: WrapMode = "auto",
               block_types: Sequence[type] = (), param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: Optional[torch.dtype] = None, reshard_after_forward: bool = True,
               find_unused_parameters: bool = False) -> nn.Module:
    """Wrap ``model`` for data parallel training.

    ``auto``/``ddp``: DistributedDataParallel when world_size > 1. ``fsdp``: FSDP2
    ``fully_shard`` on every submodule whose class is in ``block_types`` (e.g. ResBlock, AttnBlock,
    TimestepBlock), then on the root; ``param_dtype``/``reduce_dtype`` form its mixed-precision
    policy. ``none`` or a single process: the model is returned unchanged. The model must already
    be on ``info.device``."""
    if mode not in ("auto", "none", "ddp", "fsdp"):
        raise ValueError(f"unknown wrap mode {mode!r}")
    if mode == "none" or info.world_size == 1:
        return model
    if not is_initialized():
        raise RuntimeError("wrap_model: world_size > 1 but no process group; call init_distributed first")
    if mode in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = tuple(block_types)
    kind = type(model).__name__  # before fully_shard renames the class
    wrapped = 0
    if blocks:
        # Children first (reverse pre-order) so each block becomes its own shard group.
        for module in reversed(list(model.modules())):
            if module is not model and isinstance(module, blocks):
                fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
                wrapped += 1
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    trains = any(p.requires_grad for p in model.parameters())
    log.info("FSDP2: sharded %d blocks + root of the %s %s over %d ranks", wrapped,
             "trained" if trains else "frozen", kind, info.world_size)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded (DTensor) parameters."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly FSDP2-sharded DTensor) tensor; collective for DTensors."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm of ``params`` to ``max_norm`` in place and return the norm
    before clipping (collective when some gradients are FSDP2 shards).

    ``torch.nn.utils.clip_grad_norm_`` refuses a mix of sharded (DTensor) and plain gradients,
    e.g. a sharded network plus trained rows inside an unsharded frozen one: the two groups' norms
    are then combined here, and both groups are scaled by the same factor."""
    sharded = [p for p in params if hasattr(p, "full_tensor")]
    if not sharded or len(sharded) == len(params):
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    plain = [p for p in params if not hasattr(p, "full_tensor")]
    with torch.no_grad():
        norm_sharded = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in sharded]))
        norm_plain = torch.nn.utils.get_total_norm([p.grad for p in plain])
        norms = [norm_sharded.float(), norm_plain.float().to(norm_sharded.device)]
        total = torch.linalg.vector_norm(torch.stack(norms))
        # The factor clip_grad_norm_ uses, as a number: it multiplies DTensors and tensors alike.
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for p in params:
            p.grad.mul_(coef)
    return float(total)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 keeps the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (``enabled=False``): DDP
    ``no_sync``, FSDP2 ``set_requires_gradient_sync``. The reference reduced every micro-step."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif _is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# --------------------------------------------------------------------------- full state dicts
def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights with the module's own (official) keys, on CPU. Collective under
    FSDP (every rank must call it); rank 0 gets the tensors, other FSDP ranks get ``{}``."""
    model = unwrap_model(model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options(cpu_offload=True))
    # Clone CPU tensors: a snapshot must not change when training continues (e.g. async saving).
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Load full (unsharded, official-key) weights into a plain, DDP or FSDP2 model. Under FSDP
    every rank passes the full dict (each rank shards its part)."""
    model = unwrap_model(model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, dict(state_dict), options=_options(strict=strict))
    else:
        model.load_state_dict(state_dict, strict=strict)


def _models_arg(models: Union[nn.Module, Sequence[nn.Module]]) -> nn.Module:
    """The one module torch's state-dict functions take: the model itself, or for several a
    ``ModuleList`` holding them (parameter names then start with the model's index: ``1.weight``)."""
    if isinstance(models, nn.Module):
        return unwrap_model(models)
    plain = [unwrap_model(m) for m in models]
    return plain[0] if len(plain) == 1 else nn.ModuleList(plain)


def full_optimizer_state_dict(models: Union[nn.Module, Sequence[nn.Module]], optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names (portable across world sizes), unsharded,
    on CPU. Collective under FSDP; rank 0 gets the state, other FSDP ranks may get ``{}``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(_models_arg(models), optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state_dict(models: Union[nn.Module, Sequence[nn.Module]], optimizer: torch.optim.Optimizer,
                                   state: dict) -> None:
    """Inverse of ``full_optimizer_state_dict`` (every rank passes the full state)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(_models_arg(models), optimizer, state, options=_options())
