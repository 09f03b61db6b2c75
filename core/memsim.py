"""Simulated GPU memory of one training step, on a CPU, at full size.

Why: the question users ask first is "does it fit my card?", and no GPU is at hand to measure it.
The simulation runs the job's real step (the caller's code: encoders, noising, forward, loss,
backward, clipping, optimizer step) on fake tensors (``FakeTensorMode``: shapes and dtypes, no
storage, seconds for billions of parameters) and counts the bytes a CUDA caching allocator would
hand out, the figure ``torch.cuda.max_memory_allocated`` reports:

* every storage counts from its creation to the death of its last reference (a weakref finalizer
  on the untyped storage), rounded up to the allocator's 512-byte blocks, once however many views
  share it;
* storages are tagged by what they are (:data:`CATEGORIES`: weights, gradients, optimizer
  states, activations, temporaries) and by the phase that made them, so the peak comes with its
  phase and breakdown.

The fake tensors live on the CPU (a fake CUDA tensor runs a forward but the autograd engine fails
on it without a GPU), so the CPU is made to take the decisions a CUDA GPU takes, while
:func:`gpu_decisions` is active:

* autocast follows CUDA's op lists (:data:`CUDA_AUTOCAST`), not the CPU's: layer/group norm,
  norms, softmax, exp/pow and the losses run in float32, and ``cat``/``stack`` are not promoted;
  the kernels of the CPU's ``AutocastCPU`` dispatch key are replaced for that time
  (``torch.library``), and restored afterwards;
* ``scaled_dot_product_attention`` takes the fused path an H100 takes for bf16 attention (flash;
  dropout included): the saved set is q, k, v, the output and a float32 log-sum-exp per query,
  never the T x T probabilities of the math kernel;
* dropout is the fused ``native_dropout`` (its saved mask is bool, not float);
* the optimizers keep their ``foreach`` implementations (PyTorch picks them for CUDA tensors
  only): :func:`gpu_decisions` makes the default choice say yes for CPU tensors too, so the
  optimizer's multi-tensor temporaries are counted.

Not counted (as in ``max_memory_allocated``): the CUDA context, cuBLAS/cuDNN workspaces, the
allocator's cached but free blocks and the slack of split blocks. Host-resident tensors (block
offload's pinned copies) are excluded when their creator reports them with :func:`mark_host`.

tests/test_memsim.py proves the emulation: a forward op by op equals the same forward on fake
CUDA tensors, and on tiny sizes the simulated peak equals the peak counted on real tensors.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

GIB = 2**30
#: The caching allocator hands out multiples of 512 bytes (``kMinBlockSize``).
BLOCK = 512
CATEGORIES = ("weights", "gradients", "optimizer states", "activations", "temporaries")

# ------------------------------------------------------------------------------------------------
# CUDA's autocast op lists (ATen autocast_mode.h, AT_FORALL_* of the AutocastCUDA key) and the
# CPU's (autocast_mode.cpp, AutocastCPU), as "op" or "op.overload"
# ------------------------------------------------------------------------------------------------
_CUDA_LOWER = """_convolution.deprecated _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d
conv_transpose2d.input conv_transpose3d.input convolution prelu addmm addmv addr matmul einsum mm mv
linalg_vecdot linear addbmm baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell
_thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell scaled_dot_product_attention"""
_CUDA_FP32 = """acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan
pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm group_norm
frobenius_norm.dim nuclear_norm nuclear_norm.dim cosine_similarity poisson_nll_loss
cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss
huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss triplet_margin_loss
multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp
upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d
upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d
_upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa"""
_CUDA_FP32_SET_OPT_DTYPE = """prod prod.dim_int softmax.int log_softmax.int cumprod cumsum
linalg_vector_norm linalg_matrix_norm linalg_matrix_norm.str_ord sum sum.dim_IntList"""
_CUDA_FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
_CUDA_PROMOTE = "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add"
#: CPU-only entries: on a GPU these ops run without autocast's casts (replaced by a pass-through).
_CPU_ONLY = """conv1d.padding conv2d.padding conv3d.padding _addmm_activation mkldnn_rnn_layer
_native_multi_head_attention avg_pool3d binary_cross_entropy polar quantile quantile.scalar
nanquantile nanquantile.scalar stft stft.center grid_sampler_2d _grid_sampler_2d_cpu_fallback
grid_sampler_3d trace view_as_complex cholesky cholesky_inverse cholesky_solve inverse lu_solve
orgqr ormqr pinverse max_pool3d max_unpool2d max_unpool3d adaptive_avg_pool3d reflection_pad1d
reflection_pad2d replication_pad1d replication_pad2d replication_pad3d cross_entropy_loss
ctc_loss.IntList ctc_loss.Tensor fft_fft fft_ifft fft_fft2 fft_ifft2 fft_fftn fft_ifftn fft_rfft
fft_irfft fft_rfft2 fft_irfft2 fft_rfftn fft_irfftn fft_hfft fft_ihfft linalg_cond linalg_cond.p_str
linalg_matrix_rank linalg_matrix_rank.tol_tensor linalg_matrix_rank.atol_rtol_tensor
linalg_matrix_rank.atol_rtol_float linalg_solve linalg_cholesky linalg_svdvals linalg_eigvals
linalg_eigvalsh linalg_inv linalg_householder_product linalg_tensorinv linalg_tensorsolve
fake_quantize_per_tensor_affine geqrf _lu_with_info qr svd triangular_solve fractional_max_pool2d
fractional_max_pool3d adaptive_max_pool3d multilabel_margin_loss_forward linalg_qr
linalg_cholesky_ex linalg_svd linalg_eig linalg_eigh linalg_lstsq linalg_inv_ex stack cat
index_copy"""
#: Lower-precision ops on both lists keep the CPU's kernel (same policy; it also keeps autocast's
#: cache of bf16 weight copies, which is per device-agnostic C++).
_BOTH_LOWER = set("""conv1d conv2d conv3d bmm mm linalg_vecdot baddbmm addmm addbmm linear
_convolution.deprecated matmul conv_tbc conv_transpose1d conv_transpose2d.input
conv_transpose3d.input prelu""".split())

#: policy -> op names: what CUDA autocast does, as emulated on the CPU.
CUDA_AUTOCAST: dict[str, list[str]] = {
    "lower": [o for o in _CUDA_LOWER.split() if o not in _BOTH_LOWER],
    "fp32": _CUDA_FP32.split(),
    "fp32_set_opt_dtype": _CUDA_FP32_SET_OPT_DTYPE.split(),
    "fp32_append_dtype": list(_CUDA_FP32_APPEND_DTYPE),
    "promote": _CUDA_PROMOTE.split(),
}


def _overload(name: str) -> Optional[torch._ops.OpOverload]:
    op, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, op, None)
    if packet is None:
        return None
    return getattr(packet, overload or "default", None)


def _eligible(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == "cpu"


_NO_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _cast_all(args: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda t: t.to(dtype) if _eligible(t) and t.dtype != dtype else t, args)


def _kernel(policy: str, op: torch._ops.OpOverload) -> Callable:
    """The AutocastCPU kernel that does what CUDA's autocast does for ``op``."""
    def run(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
            lower = torch.get_autocast_dtype("cpu")
            if policy == "lower":
                args, kwargs = _cast_all((args, kwargs), lower)
            elif policy == "fp32":
                args, kwargs = _cast_all((args, kwargs), torch.float32)
            elif policy == "promote":
                floats = [t for t in tree_flatten((args, kwargs))[0] if _eligible(t)]
                to = torch.float32 if any(t.dtype == torch.float32 for t in floats) else lower
                args, kwargs = _cast_all((args, kwargs), to)
            elif policy == "fp32_set_opt_dtype" and _eligible(args[0]):
                args, kwargs = _with_dtype(op, list(args), dict(kwargs), torch.float32, keep=True)
            elif policy == "fp32_append_dtype":
                target = _overload(_CUDA_FP32_APPEND_DTYPE[str(op.name()).replace("aten::", "") + "." + op._overloadname])
                to = torch.float32 if _eligible(args[0]) else args[0].dtype
                args, kwargs = _with_dtype(target, list(args), dict(kwargs), to, keep=False)
                return target(*args, **kwargs)
            return op(*args, **kwargs)

    return run


def _with_dtype(op: torch._ops.OpOverload, args: list, kwargs: dict, dtype: torch.dtype, keep: bool
                ) -> tuple[list, dict]:
    """``op``'s arguments with its ``dtype`` argument set (``keep``: only where it is None)."""
    schema = op._schema.arguments
    index = next(i for i, a in enumerate(schema) if a.name == "dtype")
    if schema[index].kwarg_only:
        if not keep or kwargs.get("dtype") is None:
            kwargs["dtype"] = dtype
        return args, kwargs
    while len(args) <= index:
        a = schema[len(args)]
        if a.name in kwargs:
            args.append(kwargs.pop(a.name))
        else:
            args.append(a.default_value if a.has_default_value() else None)
    if not keep or args[index] is None:
        args[index] = dtype
    return args, kwargs


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a GPU runs it for training: a fused kernel that saves q, k, v, the output and a
    float32 log-sum-exp per query (flash for bf16/fp16; memory-efficient for float32 or a mask,
    whose saved set is the same up to the log-sum-exp's padding to 32 queries). Dropout is not
    applied: the fused kernels regenerate its mask from a seed, so it adds no memory, and a
    simulation counts bytes, not values (the CPU kernel has no dropout)."""
    if enable_gqa:
        raise NotImplementedError("memsim: enable_gqa attention is not emulated")
    del dropout_p
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _dropout(input, p, train):
    """Dropout as on a GPU: the fused ``native_dropout`` (a bool mask is saved), where the CPU
    composes it from a float mask."""
    if p == 0 or not train or input.numel() == 0:
        return input
    return torch.ops.aten.native_dropout(input, p, train)[0]


_ACTIVE = threading.local()


@contextlib.contextmanager
def gpu_decisions() -> Iterator[None]:
    """While active, CPU tensors take a CUDA GPU's decisions (see the module docstring)."""
    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - dropped again on exit
    from torch.optim import optimizer as optim_mod

    original_default = optim_mod._default_to_fused_or_foreach
    patched: list = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for policy, names in CUDA_AUTOCAST.items():
                for name in names:
                    op = _overload(name)
                    if op is not None:
                        lib.impl(name, _kernel(policy, op), "AutocastCPU")
            for name in _CPU_ONLY.split():
                op = _overload(name)
                if op is not None and name not in _BOTH_LOWER:
                    lib.impl(name, _passthrough(op), "AutocastCPU")
            lib.impl("scaled_dot_product_attention", _sdpa, "CompositeImplicitAutograd")
            lib.impl("dropout", _dropout, "CompositeImplicitAutograd")

        def default_foreach(params, differentiable, use_fused=False):
            # PyTorch's rule for CUDA tensors (foreach unless differentiable), here for all
            fused, foreach = original_default(params, differentiable, use_fused)
            return fused, (not differentiable and not fused) or foreach

        # the optimizers import the rule by name: patch every copy
        patched = [m for name, m in list(sys.modules.items()) if name.startswith("torch.optim")
                   and getattr(m, "_default_to_fused_or_foreach", None) is original_default]
        for m in patched:
            m._default_to_fused_or_foreach = default_foreach
        yield
    finally:
        for m in patched:
            m._default_to_fused_or_foreach = original_default
        lib._destroy()


def _passthrough(op: torch._ops.OpOverload) -> Callable:
    def run(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
            return op(*args, **kwargs)
    return run


# ------------------------------------------------------------------------------------------------
# Counting live storages
# ------------------------------------------------------------------------------------------------
def _owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage holds its data: plain and fake tensors; a wrapper subclass (e.g. a
    quantised weight) reports a storage of its dense size while its inner tensors hold the bytes."""
    from torch._subclasses.fake_tensor import FakeTensor

    return type(t) in (torch.Tensor, nn.Parameter) or isinstance(t, FakeTensor)


def _rounded(nbytes: int) -> int:
    return -(-int(nbytes) // BLOCK) * BLOCK


@dataclass
class Peak:
    """The largest count and what made it up."""

    bytes: int = 0
    phase: str = ""
    breakdown: dict[str, int] = field(default_factory=dict)


class LiveMemory(TorchDispatchMode):
    """Counts the bytes of live storages as a CUDA caching allocator's ``allocated`` figure.

    Every storage an operation returns is counted from then until its last reference dies; the
    tensors that exist before (weights) are registered with :meth:`track`. ``phase`` names what
    runs now; new storages are tagged by :attr:`phase_category`, and :meth:`tag` re-tags one
    (a gradient, an optimizer state). ``peak`` and ``phase_peaks`` hold the maxima.
    """

    #: phase -> category of the storages it creates
    phase_category = {"forward": "activations", "encode": "activations", "setup": "temporaries"}

    def __init__(self, fake: bool = True) -> None:
        super().__init__()
        self.fake = fake
        self.live: dict[int, list] = {}          # id(storage) -> [rounded bytes, category, storage key]
        self.totals: dict[str, int] = {c: 0 for c in CATEGORIES}
        self.host: set[int] = set()              # storages marked host-resident: not counted
        self.current = 0
        self.phase = "setup"
        self.peak = Peak()
        self.phase_peaks: dict[str, int] = {}

    # -- registration --------------------------------------------------------------------------
    def track(self, t: torch.Tensor, category: str) -> None:
        """Count ``t``'s storage (if it is not counted yet) as ``category``; re-tag it otherwise."""
        if not _owns_storage(t):
            return  # a wrapper subclass (quantised or host weight): its inner tensors are counted
        s = t.untyped_storage()
        key = id(s)
        if key in self.host:
            return
        entry = self.live.get(key)
        if entry is None:
            size = _rounded(s.nbytes())
            self.live[key] = [size, category, s._cdata]
            self.totals[category] += size
            self.current += size
            weakref.finalize(s, self._free, key)
            self._update()
        elif entry[1] != category:
            self.totals[entry[1]] -= entry[0]
            self.totals[category] += entry[0]
            entry[1] = category

    def tag(self, t: Optional[torch.Tensor], category: str) -> None:
        """Re-tag a counted tensor's storage (or count it) as ``category``."""
        if isinstance(t, torch.Tensor):
            self.track(t, category)

    def exclude(self, t: torch.Tensor) -> None:
        """Stop counting ``t``'s storage (host memory), now and later."""
        s = t.untyped_storage()
        key = id(s)
        entry = self.live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]
            self.current -= entry[0]
        self.host.add(key)
        weakref.finalize(s, self.host.discard, key)

    def exclude_storages(self, keys: set[int]) -> None:
        """Stop counting the live storages whose ``untyped_storage()._cdata`` is in ``keys``."""
        for key, entry in list(self.live.items()):
            if entry[2] in keys:
                self.live.pop(key)
                self.totals[entry[1]] -= entry[0]
                self.current -= entry[0]
                self.host.add(key)

    def _free(self, key: int) -> None:
        self.host.discard(key)  # an id is reused once its storage is gone
        entry = self.live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]
            self.current -= entry[0]

    def _update(self) -> None:
        if self.current > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.current
        if self.current > self.peak.bytes:
            self.peak = Peak(self.current, self.phase, dict(self.totals))

    def reset_peak(self) -> None:
        """Forget the maxima so far (as ``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = Peak(self.current, self.phase, dict(self.totals))
        self.phase_peaks = {}

    # -- the dispatch hook --------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.fake:
            return _stand_in_scalar(args[0])
        out = func(*args, **(kwargs or {}))
        category = self.phase_category.get(self.phase, "temporaries")
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _owns_storage(t):
                s = t.untyped_storage()
                entry = self.live.get(id(s))
                if entry is None:
                    self.track(t, category)
                elif entry[0] != _rounded(s.nbytes()):   # resized in place (out= variants)
                    size = _rounded(s.nbytes())
                    self.totals[entry[1]] += size - entry[0]
                    self.current += size - entry[0]
                    entry[0] = size
                    self._update()
        return out


def fake_materialize(module: nn.Module, device: Any = "cpu",
                     init: Optional[Callable[[str, torch.Tensor], None]] = None) -> nn.Module:
    """A meta-device module given storage on ``device`` (under a fake mode: fake storage),
    parameters and buffers replaced (fake tensors cannot be swapped), shared tensors kept shared;
    ``init(name, tensor)`` fills each new floating tensor when given (else uninitialised)."""
    new: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is None:
                    continue
                if id(t) not in new:
                    x = torch.empty(t.shape, dtype=t.dtype, device=device)
                    if init is not None and x.is_floating_point():
                        with torch.no_grad():
                            init(k, x)
                    new[id(t)] = nn.Parameter(x, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else x
                table[k] = new[id(t)]
    return module


def _stand_in_scalar(t: torch.Tensor) -> Any:
    """A fake tensor has no value; ``.item()`` (Adafactor's step size, a schedule's bounds) gets
    a plausible one: memory never depends on it, only shapes do."""
    constant = getattr(t, "constant", None)
    if constant is not None:
        return constant.item()
    if t.dtype == torch.bool:
        return True
    return 1 if not t.dtype.is_floating_point else 0.5


def active_counter() -> Optional[LiveMemory]:
    """The counter of the simulation running in this thread, if any."""
    return getattr(_ACTIVE, "counter", None)


def mark_host(t: torch.Tensor) -> torch.Tensor:
    """Declare ``t`` host-resident (e.g. a pinned CPU copy of offloaded weights): a simulation
    running now does not count it as GPU memory. Returns ``t``; a no-op outside a simulation."""
    counter = active_counter()
    if counter is not None:
        counter.exclude(t)
    return t


# ------------------------------------------------------------------------------------------------
# One simulated step
# ------------------------------------------------------------------------------------------------
@dataclass
class SimResult:
    """What one simulated training step held."""

    peak_bytes: int
    peak_phase: str
    breakdown: dict[str, int]                 # category -> bytes at the peak
    phase_peaks: dict[str, int]               # phase -> highest count during it
    resident_bytes: dict[str, int]            # category -> bytes before the step (weights, states)
    seconds: float = 0.0

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def as_dict(self) -> dict[str, Any]:
        g = lambda b: round(b / GIB, 3)  # noqa: E731
        return {"simulated_peak_gib": g(self.peak_bytes), "peak_phase": self.peak_phase,
                "breakdown_gib": {k: g(v) for k, v in self.breakdown.items()},
                "phase_peaks_gib": {k: g(v) for k, v in self.phase_peaks.items()},
                "resident_gib": {k: g(v) for k, v in self.resident_bytes.items()},
                "simulate_seconds": round(self.seconds, 1)}


class Phases:
    """Handed to the step: ``phases("backward")`` says what runs from now on."""

    def __init__(self, counter: LiveMemory) -> None:
        self.counter = counter

    def __call__(self, name: str) -> None:
        self.counter.phase = name


@dataclass
class SimJob:
    """A built training job for :func:`simulate`.

    ``modules``: every resident network (trained and frozen); ``optimizer`` over ``params`` (the
    trained parameters); ``step(phases)`` runs ONE training step, calling ``phases(name)`` as it
    goes (encode, forward, backward, clip, optimizer, ...). ``warmup(phases)`` (optional) runs
    before the counted step, e.g. one optimizer step that creates the optimizer's states, so the
    counted step is a steady-state one.
    """

    modules: Iterable[nn.Module]
    params: list[torch.Tensor]
    step: Callable[[Phases], None]
    optimizer: Optional[torch.optim.Optimizer] = None
    warmup: Optional[Callable[[Phases], None]] = None


def stored_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data (a quantised weight's codes and scales)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or _owns_storage(t):
        return [t]
    names, _meta = t.__tensor_flatten__()
    return [x for n in names for x in stored_tensors(getattr(t, n))]


def _tag_state(counter: LiveMemory, job: SimJob) -> None:
    for m in job.modules:
        for t in list(m.parameters()) + list(m.buffers()):
            for inner in stored_tensors(t):
                counter.tag(inner, "weights")
    if job.optimizer is not None:
        for state in job.optimizer.state.values():
            for k, v in state.items():
                if k == "step" and isinstance(v, torch.Tensor) and v.numel() == 1:
                    counter.exclude(v)  # a CPU scalar on a GPU run too (not capturable/fused)
                elif isinstance(v, torch.Tensor):
                    counter.tag(v, "optimizer states")


def _exclude_host_copies(counter: LiveMemory) -> None:
    """Block offload's host copies (core/offload.py registers every one it makes) are host memory."""
    offload = sys.modules.get("core.offload")
    if offload is not None:
        counter.exclude_storages(offload.host_storage_keys())


def simulate(build: Callable[[], SimJob], fake: bool = True) -> SimResult:
    """Build the job and run one counted training step under :func:`gpu_decisions`.

    ``build()`` runs inside the fake mode (``fake=False``: real CPU tensors, for the tests that
    compare both counts) and the counter, so every storage it makes is counted. Gradients are
    tagged when they are accumulated into ``.grad``; the optimizer's states after ``warmup``."""
    import time

    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.perf_counter()
    counter = LiveMemory(fake)
    phases = Phases(counter)
    # non-fake inputs: the meta-device modules that are built, then given (fake) storage
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    _ACTIVE.counter = counter
    try:
        with fake_mode, gpu_decisions(), counter:
            counter.phase = "setup"
            job = build()
            hooks = [p.register_post_accumulate_grad_hook(lambda p: counter.tag(p.grad, "gradients"))
                     for p in job.params]
            _tag_state(counter, job)
            _exclude_host_copies(counter)
            if job.warmup is not None:
                job.warmup(phases)
            _tag_state(counter, job)
            counter.phase = "setup"
            counter.reset_peak()
            resident = dict(counter.totals)
            job.step(phases)
            for h in hooks:
                h.remove()
            result = SimResult(counter.peak.bytes, counter.peak.phase, counter.peak.breakdown,
                               dict(counter.phase_peaks), resident)
            del job
    finally:
        _ACTIVE.counter = None
    result.seconds = time.perf_counter() - started
    return result


def optimizer_warmup(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable[[Phases], None]:
    """A ``SimJob.warmup`` that runs one optimizer step on zero gradients (creating its states)
    and drops the gradients again."""
    def run(phases: Phases) -> None:
        phases("setup")
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def format_result(r: SimResult) -> str:
    """One line: peak, phase, breakdown (GiB)."""
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r.breakdown.items() if v)
    return f"simulated peak {r.peak_gib:.2f} GiB in {r.peak_phase} ({parts})"


__all__ = ["fake_materialize", "stored_tensors", "gpu_decisions", "LiveMemory", "simulate", "SimJob", "SimResult", "Phases", "mark_host",
           "active_counter", "optimizer_warmup", "format_result", "CUDA_AUTOCAST", "CATEGORIES", "GIB"]
