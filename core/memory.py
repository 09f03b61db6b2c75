"""Analytic per-rank GPU memory estimate of a training run (printed by ``--dry-run`` and ``bench/``).

Why an estimate: users need to know BEFORE renting a GPU whether a configuration fits. The job
describes its run as a :class:`MemorySpec` (which networks it trains, how one training forward
looks at the per-rank micro-batch and image size, what else it keeps loaded, how many ranks share
the work and which networks FSDP shards); :func:`estimate_memory` turns that into bytes held by
ONE rank (one GPU). The figure is the resident part (weights, optimizer states, what data
parallelism adds) plus the largest of the step's three high points: backward (the larger of the
saved activations and the gradients, which fill up as the activations are freed, plus one unit's
workspace), the optimizer step (every gradient + the step's temporaries) and the frozen encoders'
no-grad forward (``transient``). core/memsim.py simulates the whole step for comparison
(``--dry-run --simulate``, ``bench/gpu.py --simulate``). The parts are

* weights of the networks the spec builds: trainable parameters, and frozen parameters + buffers
  of those networks (a frozen generator under an adapter, say), each at its built dtype;
* weights of the frozen parts the spec only counts (``spec.frozen``: encoders, decoders ... that
  take no part in the trained forward); a cached run simply lists none;
* gradients of the trainable parameters (same dtype as the parameter);
* optimizer states, per optimizer (adamw: 2 states of the parameter dtype, float32 with stochastic
  rounding; adafactor: factored row/column second moments; prodigy: 4 states; adamw8bit: 2
  one-byte states + a float32 absmax per 256-element block, bitsandbytes' rule that tensors under
  4096 elements keep 32-bit states), and the temporaries of one step (:func:`optimizer_step_bytes`:
  AdamW's foreach implementation holds one state's worth);
* activations saved for backward at the spec's batch and image size, with and without gradient
  checkpointing, plus a backward workspace of one checkpoint unit;
* with several ranks, what data parallelism adds (see below).

Several ranks (``world_size > 1``): without FSDP (DDP) every rank holds everything above, plus
DDP's gradient buckets (a flat copy of every gradient, DDP's default layout). With FSDP
(``fsdp_networks``) the parameters of those networks are split along dim 0 as FSDP2 does
(each rank keeps ``ceil(dim0 / world_size)`` rows of every tensor, zero-padded), so their weights,
gradients and optimizer states are the per-rank shards (about ``full / world_size``); buffers, the
counted frozen parts, the networks not listed and the activations stay whole on every rank. A rank
also holds, transiently, the all-gathered shard units: the parameters of its networks outside any
unit (the root group) + the two largest units (the running one and the prefetched next one) in the
compute dtype (bf16 under autocast, FSDP's ``param_dtype``), and the unsharded gradients of the
largest unit in the reduce dtype (float32 under autocast) before their reduce-scatter.

Activations are not guessed from formulas: the real modules run ONE forward on fake tensors
(``FakeTensorMode``: shapes and dtypes, no storage, a few seconds even for billions of parameters)
under bf16 autocast, and ``saved_tensors_hooks`` collect every tensor autograd keeps
(deduplicated by storage, parameters excluded), with the CPU taking a CUDA GPU's decisions
(``core.memsim.gpu_decisions``: CUDA's autocast lists, the fused attention that keeps q, k, v, the
output and a float32 log-sum-exp per query, fused dropout). With checkpointing the saved set becomes:
what is saved outside the checkpoint units + the largest, over the units in call order, of the
inputs kept for the units called so far (for their recomputation) + that unit's own saved set
(alive while it is recomputed in backward; backward frees the later units' inputs first).

Not counted: the CUDA context (~0.5 GiB, outside ``max_memory_allocated``), allocator
fragmentation, NCCL's own buffers, the frozen parts' transient no-grad activations, activations of
networks outside the spec's forward.

The job-specific specs (which networks, which inputs) live with the jobs (``train/memory_specs.py``);
nothing here knows a particular network.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8,
          None: torch.float32}
OPTIMIZERS = ("adamw", "adamw_fused", "adafactor", "adamw8bit", "prodigy")

#: A frozen part that only needs counting: a parameter count (stored in ``MemorySpec.frozen_dtype``),
#: ``(count, dtype)`` with the dtype as a ``torch.dtype`` or a name of :data:`DTYPES`, or a module
#: (meta device is enough) whose parameters are counted at their own dtype.
FrozenPart = Union[int, tuple[int, Union[str, torch.dtype]], nn.Module]


@dataclass
class MemorySpec:
    """A job's description of one training run, everything :func:`estimate_memory` needs.

    ``build`` and ``forward`` are called under ``FakeTensorMode`` (tensors without storage), so they
    may build full-size networks and full-size inputs for free. Build modules directly in their
    storage dtype (:func:`default_dtype`): ``.to(dtype)`` cannot swap fake parameters.
    """

    #: What runs, first words of the table header (e.g. ``"<kind> <version> <mode>"``).
    title: str
    #: Builds every network the trained forward touches, with ``requires_grad`` set on the trained
    #: parameters; frozen parameters and buffers of these networks count as frozen weights.
    build: Callable[[], nn.Module]
    #: One training forward of the built networks at the per-rank micro-batch and image size,
    #: returning the loss (it creates its own example inputs).
    forward: Callable[[nn.Module], torch.Tensor]
    #: Per-rank micro-batch size and image size (height, width) that ``forward`` uses (for the header).
    batch_size: int
    image_size: tuple[int, int]
    #: Every submodule of these classes is one gradient-checkpointing unit, and one FSDP shard unit
    #: inside the ``fsdp_networks``.
    unit_types: tuple[type, ...] = ()
    #: Further checkpointing units that are not found by class (e.g. a network's top-level stages).
    extra_units: Optional[Callable[[nn.Module], Sequence[nn.Module]]] = None
    #: The trained parameters; None = every built parameter with ``requires_grad``.
    trainable: Optional[Callable[[nn.Module], Iterable[nn.Parameter]]] = None
    #: Frozen parts kept in memory that take no part in the trained forward, name -> :data:`FrozenPart`.
    frozen: Mapping[str, FrozenPart] = field(default_factory=dict)
    #: Storage dtype name of the trained parameters (header only: the bytes come from the built tensors).
    weight_dtype: str = "float32"
    #: Storage dtype name of the frozen networks; the dtype of plain counts in ``frozen``.
    frozen_dtype: str = "bfloat16"
    #: One of :data:`OPTIMIZERS`.
    optimizer: str = "adamw"
    #: Optimizer states in this dtype whatever the parameter's (stochastic rounding keeps float32
    #: moments of bf16 weights); None = the parameter's dtype.
    optimizer_state_dtype: Optional[str] = None
    #: The frozen parts' no-grad forward of one step (encoders before the trained forward), run on
    #: fake tensors: its transient peak is one candidate for the step's peak. None = not counted.
    transient: Optional[Callable[[], Any]] = None
    #: Of the units found by ``unit_types``, those that gradient checkpointing recomputes (e.g.
    #: every N-th block); None = all of them.
    unit_filter: Optional[Callable[[list], list]] = None
    #: Block offload: frozen weights inside the ``unit_types`` units live in host memory, a ring
    #: of this many units' frozen weights on the device (0 = no offload).
    offload_blocks: int = 0
    #: Fused backward: each parameter is stepped inside backward and its gradient freed, so
    #: neither all gradients nor the optimizer step's temporaries exist at once.
    fused_backward: bool = False
    #: bf16 autocast of the forward (as on the GPU).
    autocast: bool = True
    #: Whether the run as configured turns gradient checkpointing on (marks the matching peak).
    gradient_checkpointing: bool = False
    #: Conditions read from a cache (header only).
    cached: bool = False
    #: Extra parameter counts to report, from the built networks (e.g. ``{"generator": n}``).
    param_counts: Optional[Callable[[nn.Module], Mapping[str, int]]] = None
    #: Row label of the built networks' frozen weights.
    frozen_label: str = "weights (frozen)"
    #: The job's own description of the run, copied into the estimate's ``shape``.
    details: Mapping[str, Any] = field(default_factory=dict)
    #: Ranks of the run (processes, one GPU each); the estimate is what ONE rank holds.
    world_size: int = 1
    #: FSDP: names (``get_submodule`` paths of ``build()``'s result) of the networks whose parameters
    #: are sharded over the ``world_size`` ranks; None = no sharding (DDP when ``world_size > 1``).
    fsdp_networks: Optional[Sequence[str]] = None
    #: The device the dtypes above assume (printed; e.g. a GPU kind and its default precision),
    #: since the estimate usually runs on another machine.
    device: str = ""


def _dtype(name: Union[str, torch.dtype, None]) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else DTYPES[name]


def _dtype_bytes(name: Union[str, torch.dtype, None]) -> int:
    return torch.empty((), dtype=_dtype(name)).element_size()


@contextlib.contextmanager
def default_dtype(dtype: Union[str, torch.dtype, None]) -> Iterator[None]:
    """Build modules directly in ``dtype`` for the duration (``.to(dtype)`` cannot swap fake
    parameters, so a spec's ``build`` creates them in their storage dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(_dtype(dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def modules_of_types(root: nn.Module, types: tuple[type, ...]) -> list[nn.Module]:
    """Submodules of ``root`` that are instances of ``types``, in registration order."""
    return [m for m in root.modules() if isinstance(m, types)] if types else []


# ------------------------------------------------------------------------------------------------
# Optimizer states
# ------------------------------------------------------------------------------------------------
def optimizer_state_bytes(params: Sequence[torch.Tensor], optimizer: str,
                          state_dtype: Union[str, torch.dtype, None] = None) -> int:
    """Bytes of the optimizer state of ``params`` (shapes and dtypes only are read); the states
    take the parameter's dtype unless ``state_dtype`` is given (stochastic rounding: float32)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {OPTIMIZERS}")
    total = 0
    for p in params:
        n = p.numel()
        size = p.element_size() if state_dtype is None else _dtype_bytes(state_dtype)
        if optimizer in ("adamw", "adamw_fused"):
            total += 2 * n * size                      # exp_avg, exp_avg_sq like the parameter
        elif optimizer == "prodigy":
            total += 4 * n * size                      # prodigyopt: exp_avg, exp_avg_sq, s, p0
        elif optimizer == "adafactor":
            if p.dim() >= 2:                           # torch.optim.Adafactor: row + column variance
                rows = math.prod(p.shape[:-1])
                cols = math.prod(p.shape[:-2]) * p.shape[-1]
                total += (rows + cols) * size
            else:
                total += n * size
        else:                                          # bitsandbytes AdamW8bit, blockwise (256)
            total += 2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 2 * n * 4
    return total


#: Temporaries of one optimizer step, in float32 copies of the largest parameter tensor, for the
#: implementations that step one tensor at a time (measured by core/memsim.py on Stage C 3.6B).
_SINGLE_TENSOR_TEMPS = {"adafactor": 3, "prodigy": 3, "stochastic_rounding": 10}


def optimizer_step_bytes(params: Sequence[torch.Tensor], optimizer: str,
                         state_dtype: Union[str, torch.dtype, None] = None) -> int:
    """Transient bytes of one optimizer step on a GPU: AdamW's default ``foreach`` implementation
    computes ``sqrt(exp_avg_sq)`` of every tensor at once (one state's worth); stochastic
    rounding (``state_dtype`` float32 on bf16 weights), Adafactor and Prodigy step one tensor at a
    time (a few float32 copies of the largest tensor); fused and 8-bit kernels keep none."""
    if not params:
        return 0
    largest = max(p.numel() for p in params) * 4
    if state_dtype is not None and optimizer in ("adamw", "adafactor"):
        return _SINGLE_TENSOR_TEMPS["stochastic_rounding"] * largest
    if optimizer == "adamw":
        return sum(p.numel() * p.element_size() for p in params)
    return _SINGLE_TENSOR_TEMPS.get(optimizer, 0) * largest


# ------------------------------------------------------------------------------------------------
# Fake-tensor forward
# ------------------------------------------------------------------------------------------------
@dataclass
class ActivationCount:
    """Bytes autograd keeps for backward after one forward."""

    full: int                 # no checkpointing
    checkpointed: int         # per-block checkpointing: its backward high point, recomputation included
    largest_unit: int         # biggest checkpoint unit's own saved set (backward workspace)


def count_activations(model: nn.Module, run: Callable[[], torch.Tensor], units: Sequence[nn.Module],
                      autocast: bool) -> ActivationCount:
    """Run ``run()`` (a forward returning the loss) under saved-tensor hooks and account the saved
    tensors per checkpoint unit (see the module docstring for the checkpointed formula)."""
    param_keys = {p.untyped_storage()._cdata for p in model.parameters()}
    sizes: dict[int, int] = {}
    owner: dict[int, Optional[int]] = {}
    inputs: dict[int, int] = {}          # storage -> the unit it first entered
    called: list[int] = []               # units in the order of their first call
    active: list[int] = []
    keep: list[torch.Tensor] = []        # keep storages alive so their ids are not reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        key = s._cdata
        if key not in param_keys and key not in sizes:
            sizes[key] = s.nbytes()
            owner[key] = active[-1] if active else None
            keep.append(t)
        return t

    def pre(index: int) -> Callable:
        def hook(_m, args):
            for a in args:
                if isinstance(a, torch.Tensor):
                    s = a.untyped_storage()
                    if s._cdata not in param_keys:
                        inputs.setdefault(s._cdata, index)
                        sizes.setdefault(s._cdata, s.nbytes())
                        keep.append(a)
            if index not in called:
                called.append(index)
            active.append(index)
        return hook

    def post(_m, _args, _out) -> None:  # must return None: a value would replace the output
        active.pop()

    handles = []
    for i, unit in enumerate(units):
        handles.append(unit.register_forward_pre_hook(pre(i)))
        handles.append(unit.register_forward_hook(post))
    from core.memsim import gpu_decisions

    ac = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        # the CPU takes a CUDA GPU's decisions (autocast lists, fused attention and dropout)
        with gpu_decisions(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ac:
            run()
    finally:
        for h in handles:
            h.remove()
    full = sum(sizes[k] for k in owner)     # everything autograd saved, once per storage
    per_unit: dict[int, int] = {}
    outside = 0
    for key, o in owner.items():
        if o is None:
            outside += sizes[key] if key not in inputs else 0
        else:
            per_unit[o] = per_unit.get(o, 0) + (sizes[key] if key not in inputs else 0)
    largest = max(per_unit.values(), default=0)
    # backward walks the units in reverse call order; recomputing unit k needs the inputs kept for
    # units called up to k (later ones are freed once their backward ran) + k's own saved set
    unit_inputs: dict[int, int] = {}
    for key, unit in inputs.items():
        unit_inputs[unit] = unit_inputs.get(unit, 0) + sizes[key]
    kept, high = 0, 0
    for unit in called:
        kept += unit_inputs.get(unit, 0)
        high = max(high, kept + per_unit.get(unit, 0))
    return ActivationCount(full=full, checkpointed=outside + high, largest_unit=largest)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _frozen_parts(spec: MemorySpec) -> dict[str, tuple[int, int]]:
    """name -> (parameter count, bytes) of ``spec.frozen``."""
    out = {}
    for name, part in spec.frozen.items():
        if isinstance(part, nn.Module):
            params = list(part.parameters())
            out[name] = (sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params))
        elif isinstance(part, tuple):
            count, dtype = part
            out[name] = (int(count), int(count) * _dtype_bytes(dtype))
        else:
            out[name] = (int(part), int(part) * _dtype_bytes(spec.frozen_dtype))
    return out


def _shard(p: torch.Tensor, world_size: int) -> torch.Tensor:
    """The local shard FSDP2 gives one rank: ``ceil(dim0 / world_size)`` rows (padded), other dims
    whole; a 0-d tensor is one element. Created under the caller's fake mode (no storage)."""
    shape = tuple(p.shape) or (1,)
    return torch.empty((-(-shape[0] // world_size),) + shape[1:], dtype=p.dtype)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` stores: a quantised weight (a wrapper subclass) by its codes and scales."""
    from core.memsim import stored_tensors

    return sum(x.numel() * x.element_size() for x in stored_tensors(t))


def _fsdp_gather_bytes(roots: Sequence[nn.Module], unit_types: tuple[type, ...], trainable_ids: set[int],
                       autocast: bool) -> int:
    """Transient all-gather memory of FSDP on one rank (see the module docstring)."""
    def compute(p: torch.Tensor) -> int:
        return p.numel() * (2 if autocast and p.is_floating_point() else p.element_size())

    def reduce(p: torch.Tensor) -> int:
        return p.numel() * (4 if autocast else p.element_size())

    total, units = 0, []
    for root in roots:
        owner: dict[int, int] = {}               # parameter -> innermost unit (pre-order: inner ones come later)
        params: dict[int, torch.Tensor] = {id(p): p for p in root.parameters()}
        root_units = modules_of_types(root, unit_types)
        for i, unit in enumerate(root_units):
            for p in unit.parameters():
                owner[id(p)] = len(units) + i
        units += [[0, 0] for _ in root_units]    # [compute bytes, reduce bytes of trained params]
        for key, p in params.items():
            if key not in owner:
                total += compute(p)              # the root group stays gathered around its forward/backward
            else:
                units[owner[key]][0] += compute(p)
                units[owner[key]][1] += reduce(p) if key in trainable_ids else 0
    sizes = sorted((u[0] for u in units), reverse=True)
    return total + sum(sizes[:2]) + max((u[1] for u in units), default=0)


def estimate_memory(spec: MemorySpec, *, activations: bool = True) -> dict:
    """Memory estimate (bytes) of the run ``spec`` describes.

    Returns ``{'shape': {...}, 'params': {...}, 'bytes': {...}, 'total': int,
    'total_checkpointed': int, 'configured_checkpointing': bool, 'frozen_label': str}``:
    ``shape`` is the spec's header fields plus its ``details``; ``params`` the spec's
    ``param_counts``, the trainable count and the count of every frozen part; ``bytes`` the rows of
    :func:`format_estimate`. ``activations=False`` skips the fake forward (weights, gradients and
    optimizer states only; instant even for billions of parameters).
    """
    if spec.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {spec.optimizer!r}; known: {OPTIMIZERS}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    ws = int(spec.world_size)
    if ws < 1:
        raise ValueError(f"MemorySpec.world_size must be >= 1, got {ws}")
    mode = "fsdp" if ws > 1 and spec.fsdp_networks is not None else "ddp" if ws > 1 else "single"
    with FakeTensorMode():
        networks = spec.build()
        trainable = (list(spec.trainable(networks)) if spec.trainable is not None
                     else [p for p in networks.parameters() if p.requires_grad])
        trainable_ids = {id(p) for p in trainable}
        blocks = modules_of_types(networks, tuple(spec.unit_types))
        units = list(spec.unit_filter(blocks)) if spec.unit_filter is not None else list(blocks)
        if spec.extra_units is not None:
            units += list(spec.extra_units(networks))
        roots = [networks.get_submodule(name) for name in spec.fsdp_networks or ()] if mode == "fsdp" else []
        sharded_ids = {id(p) for root in roots for p in root.parameters()}

        def local(p: torch.Tensor) -> torch.Tensor:  # what this rank stores of ``p``
            return _shard(p, ws) if id(p) in sharded_ids else p

        trained_local = [local(p) for p in trainable]
        trained_w = sum(_nbytes(p) for p in trained_local)
        frozen = [p for p in networks.parameters() if id(p) not in trainable_ids]
        frozen_w = sum(_nbytes(local(p)) for p in frozen) + sum(_nbytes(b) for b in networks.buffers())
        if spec.offload_blocks:  # the blocks' frozen weights in host memory, a ring of them on the device
            per_block = [sum(_nbytes(p) for p in blk.parameters() if id(p) not in trainable_ids) for blk in blocks]
            frozen_w += spec.offload_blocks * max(per_block, default=0) - sum(per_block)
        grads = trained_w
        if spec.fused_backward:  # one tensor's gradient at a time (stepped, then freed)
            grads = max((_nbytes(p) for p in trained_local), default=0)
        optim = optimizer_state_bytes(trained_local, spec.optimizer, spec.optimizer_state_dtype)
        optim_step = optimizer_step_bytes(trained_local, "adafactor" if spec.fused_backward else spec.optimizer,
                                          spec.optimizer_state_dtype)  # fused: one tensor at a time
        if mode == "fsdp":
            parallel = _fsdp_gather_bytes(roots, tuple(spec.unit_types), trainable_ids, spec.autocast)
        else:  # DDP's reducer copies every gradient into its flat buckets
            parallel = grads if mode == "ddp" else 0
        acts = (count_activations(networks, lambda: spec.forward(networks), units, spec.autocast)
                if activations else ActivationCount(0, 0, 0))
        counts = dict(spec.param_counts(networks)) if spec.param_counts is not None else {}
        n_trainable = sum(p.numel() for p in trainable)
    transient = _transient_bytes(spec.transient) if activations and spec.transient is not None else 0
    parts = _frozen_parts(spec)
    frozen_bytes = sum(b for _n, b in parts.values())
    resident = trained_w + frozen_w + frozen_bytes + optim + parallel
    rows = {"weights_trained": trained_w, "weights_frozen": frozen_w, "encoders": frozen_bytes,
            "gradients": grads, "optimizer": optim, "parallel": parallel, "activations": acts.full,
            "activations_checkpointed": acts.checkpointed, "backward_workspace": acts.largest_unit,
            "optimizer_step": optim_step, "encoder_transient": transient}

    def peak(saved: int, workspace: int) -> int:
        # the step's three high points: backward (saved activations are freed while gradients
        # fill up, so the larger of the two), the optimizer step (every gradient + its
        # temporaries), the frozen encoders' no-grad forward
        return resident + max(max(saved, grads) + workspace, grads + optim_step, transient)
    shape = {"title": spec.title, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.details.items()},
             "batch_size": spec.batch_size, "image_size": list(spec.image_size), "optimizer": spec.optimizer,
             "weight_dtype": spec.weight_dtype, "frozen_dtype": spec.frozen_dtype, "autocast": spec.autocast,
             "cached": spec.cached, "world_size": ws, "parallel": mode,
             "fsdp_networks": list(spec.fsdp_networks or ()) if mode == "fsdp" else [], "device": spec.device}
    return {"shape": shape, "params": {**counts, "trainable": n_trainable, **{k: n for k, (n, _b) in parts.items()}},
            "bytes": rows, "total": peak(acts.full, acts.largest_unit),
            "total_checkpointed": peak(acts.checkpointed, 0),
            "configured_checkpointing": spec.gradient_checkpointing, "frozen_label": spec.frozen_label}


def _transient_bytes(run: Callable[[], Any]) -> int:
    """Peak bytes of the storages ``run()`` creates (fake tensors, a CUDA GPU's decisions)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from core.memsim import LiveMemory, gpu_decisions

    counter = LiveMemory(fake=True)
    with FakeTensorMode(allow_non_fake_inputs=True), gpu_decisions(), torch.no_grad(), counter:
        run()
    return counter.peak.bytes


def _parallel_line(s: dict) -> str:
    ws = s.get("world_size", 1)
    if s.get("parallel", "single") == "single":
        return "# 1 process: this rank holds everything"
    if s["parallel"] == "ddp":
        return (f"# world size {ws}, DDP: every rank holds the full weights, gradients and optimizer states "
                f"(+ DDP gradient buckets)")
    names = ", ".join(s["fsdp_networks"])
    return (f"# world size {ws}, FSDP: weights, gradients and optimizer states of {names} sharded {ws} ways "
            f"(ceil(dim0 / {ws}) rows per tensor); replicated on every rank: the frozen encoders, buffers, "
            f"any other network and the activations")


def format_estimate(est: dict) -> str:
    """A small fixed-width table (GiB) for ``--dry-run``: what ONE rank holds."""
    b, s = est["bytes"], est["shape"]
    rows = [("weights (trained)", b["weights_trained"]), (est.get("frozen_label", "weights (frozen)"), b["weights_frozen"]),
            ("frozen encoders", b["encoders"]), ("gradients", b["gradients"]),
            (f"optimizer states ({s['optimizer']})", b["optimizer"])]
    mode = s.get("parallel", "single")
    if mode != "single":
        rows.append(("FSDP all-gathered units" if mode == "fsdp" else "DDP gradient buckets", b.get("parallel", 0)))
    rows += [("activations, no checkpointing", b["activations"]),
             ("activations, gradient checkpointing", b["activations_checkpointed"]),
             ("backward workspace", b["backward_workspace"]),
             ("optimizer step temporaries", b.get("optimizer_step", 0)),
             ("encoders' no-grad forward (transient)", b.get("encoder_transient", 0))]
    on = est["configured_checkpointing"]
    lines = [f"# memory estimate per rank: {s['title']}, per-rank micro-batch {s['batch_size']}, "
             f"{s['image_size'][0]}x{s['image_size'][1]}, weights {s['weight_dtype']}, frozen {s['frozen_dtype']}"
             f"{', from cache' if s['cached'] else ''}", _parallel_line(s)]
    if s.get("device"):
        lines.append(f"# target device: {s['device']}")
    lines += [f"{name:<38}{val / GIB:>9.2f} GiB" for name, val in rows]
    lines.append(f"{'peak, no checkpointing' + (' ' if on else ' (configured)'):<38}{est['total'] / GIB:>9.2f} GiB")
    lines.append(f"{'peak, checkpointing' + (' (configured)' if on else ''):<38}"
                 f"{est['total_checkpointed'] / GIB:>9.2f} GiB")
    lines.append("(analytic estimate: resident weights and states + the largest of backward, optimizer step and "
                 "encoders; add ~0.5 GiB CUDA context and allocator fragmentation; --simulate runs the step)")
    return "\n".join(lines)


__all__ = ["MemorySpec", "FrozenPart", "estimate_memory", "format_estimate", "optimizer_state_bytes",
           "count_activations", "ActivationCount", "default_dtype", "modules_of_types", "GIB", "DTYPES",
           "OPTIMIZERS"]
