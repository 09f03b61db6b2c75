"""Analytic GPU memory estimate of a training run (printed by ``--dry-run`` and ``bench/``).

Why an estimate: users need to know BEFORE renting a GPU whether a configuration fits. The figure
is the sum of

* weights of the trained network (its configured dtype) and of every frozen network that the run
  loads (generator under LoRA / ControlNet, CLIP text/vision, EfficientNet, Previewer, Stage A) in
  ``frozen_dtype``; encoders that a cached run (``cache_path``) or a use case does not need count 0;
* gradients of the trainable parameters (same dtype as the parameter);
* optimizer states, per optimizer (adamw: 2 states of the parameter dtype; adafactor: factored
  row/column second moments; adamw8bit: 2 one-byte states + a float32 absmax per 256-element block,
  bitsandbytes' rule that tensors under 4096 elements keep 32-bit states);
* activations saved for backward at the configured per-rank batch and image size, with and
  without gradient checkpointing, plus a backward workspace of one checkpoint unit.

Activations are not guessed from formulas: the real module runs ONE forward on fake tensors
(``FakeTensorMode``: shapes and dtypes, no storage, a few seconds even for 3.6B) under bf16
autocast, and ``saved_tensors_hooks`` collect every tensor autograd keeps (deduplicated by storage,
parameters excluded). Attention is counted as the fused SDPA kernels on GPU keep it (q, k, v, the
output and a float32 log-sum-exp per query; no attention matrix), because the CPU fallback would
materialise the matrix. With checkpointing the saved set becomes: what is saved outside the
checkpointed blocks + the inputs of every block (kept alive for the recomputation) + the largest
block's own saved set (alive while it is recomputed in backward).

Not counted: the CUDA context (~0.5 GiB, outside ``max_memory_allocated``), allocator
fragmentation, NCCL buffers, the frozen encoders' transient no-grad activations, CLIP activations
when LoRA tokens train through the text model.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: torch.float32}
OPTIMIZERS = ("adamw", "adamw_fused", "adafactor", "adamw8bit")
#: Official ControlNet 3.6B injection points (networks.md §6.2, canny/inpainting/SR).
CNET_PROJ_BLOCKS = [0, 4, 8, 12, 51, 55, 59, 63]
#: Class names of the blocks that ``set_gradient_checkpointing`` recomputes in Stage B / Stage C.
CKPT_BLOCKS = ("ResBlock", "AttnBlock", "TimestepBlock", "FeedForwardBlock")


@dataclass
class RunShape:
    """What the estimate needs to know about a run (everything a YAML config decides)."""

    kind: str = "stage_c"                    # "stage_c" | "stage_b"
    model_version: str = "3.6B"
    mode: str = "full"                       # "full" | "lora" | "controlnet"
    batch_size: int = 4                      # per rank, per micro-step
    image_size: tuple[int, int] = (1024, 1024)
    optimizer: str = "adamw"
    weight_dtype: str = "float32"            # trained parameters (full finetune); LoRA/ControlNet: float32
    frozen_dtype: str = "bfloat16"           # frozen generator (LoRA/ControlNet) and encoders
    autocast: bool = True                    # bf16 autocast of the forward (GPU)
    lora_rank: int = 4
    lora_filters: Sequence[str] = (".attn",)
    controlnet: dict = field(default_factory=lambda: {"c_in": 1, "proj_blocks": CNET_PROJ_BLOCKS,
                                                       "bottleneck_mode": "effnet"})
    cached: bool = False                     # conditions/latents read from a cache: no encoders
    image_conditioning: bool = True          # Stage C: CLIP vision model needed (image_embed_prob > 0)


# ------------------------------------------------------------------------------------------------
# Parameter counts of the frozen encoders
# ------------------------------------------------------------------------------------------------
def clip_text_params(width: int = 1280, layers: int = 32, mlp: int = 5120, vocab: int = 49408,
                     positions: int = 77, projection: int = 1280) -> int:
    """CLIPTextModelWithProjection parameters from its config (bigG-14 defaults: 694,659,840).
    Computed, not loaded: a dry run must not download 1.4 GB to print a number."""
    layer = 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 4 * width
    return vocab * width + positions * width + layers * layer + 2 * width + width * projection


def clip_vision_params(width: int = 1024, layers: int = 24, mlp: int = 4096, patch: int = 14,
                       image: int = 224, projection: int = 768) -> int:
    """CLIPVisionModelWithProjection parameters (ViT-L/14 defaults: 303,966,208)."""
    tokens = (image // patch) ** 2 + 1
    layer = 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 4 * width
    return 3 * patch * patch * width + width + tokens * width + 2 * width + layers * layer + 2 * width + width * projection


@functools.lru_cache(maxsize=None)
def _meta_params(kind: str, version: str = "default") -> int:
    from modules.registry import build_model

    return sum(p.numel() for p in build_model(kind, version, device="meta").parameters())


def _dtype_bytes(name: Optional[str]) -> int:
    return torch.empty((), dtype=DTYPES[name]).element_size()


# ------------------------------------------------------------------------------------------------
# Optimizer states
# ------------------------------------------------------------------------------------------------
def optimizer_state_bytes(params: Sequence[torch.Tensor], optimizer: str) -> int:
    """Bytes of the optimizer state of ``params`` (shapes and dtypes only are read)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {OPTIMIZERS}")
    total = 0
    for p in params:
        n, size = p.numel(), p.element_size()
        if optimizer in ("adamw", "adamw_fused"):
            total += 2 * n * size                      # exp_avg, exp_avg_sq like the parameter
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


# ------------------------------------------------------------------------------------------------
# Fake-tensor forward
# ------------------------------------------------------------------------------------------------
class _FlashSDPA(torch.autograd.Function):
    """SDPA stand-in that saves what the fused GPU kernels save (q, k, v, out, fp32 logsumexp)."""

    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[override]
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, _out, _lse = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **_kw):
        return _FlashSDPA.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class ActivationCount:
    """Bytes autograd keeps for backward after one forward."""

    full: int                 # no checkpointing
    checkpointed: int         # per-block checkpointing
    largest_unit: int         # biggest checkpoint unit's own saved set (backward workspace)


def count_activations(model: nn.Module, run: Callable[[], torch.Tensor], units: Sequence[nn.Module],
                      autocast: bool) -> ActivationCount:
    """Run ``run()`` (a forward returning the loss) under saved-tensor hooks and account the saved
    tensors per checkpoint unit (see the module docstring for the checkpointed formula)."""
    param_keys = {p.untyped_storage()._cdata for p in model.parameters()}
    sizes: dict[int, int] = {}
    owner: dict[int, Optional[int]] = {}
    inputs: set[int] = set()
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
                        inputs.add(s._cdata)
                        sizes.setdefault(s._cdata, s.nbytes())
                        keep.append(a)
            active.append(index)
        return hook

    def post(_m, _args, _out) -> None:  # must return None: a value would replace the output
        active.pop()

    handles = []
    for i, unit in enumerate(units):
        handles.append(unit.register_forward_pre_hook(pre(i)))
        handles.append(unit.register_forward_hook(post))
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ac:
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
    kept_inputs = sum(sizes[k] for k in inputs)
    return ActivationCount(full=full, checkpointed=outside + kept_inputs + largest, largest_unit=largest)


# ------------------------------------------------------------------------------------------------
# The networks of a run, on fake tensors
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Modules are built directly in their dtype: ``.to(dtype)`` cannot swap fake parameters.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _units(model: nn.Module) -> list[nn.Module]:
    """The modules ``set_gradient_checkpointing(True)`` recomputes, in execution order."""
    from modules.controlnet import ControlNet

    if isinstance(model, ControlNet):
        return list(model.backbone) + list(model.projections)
    return [m for m in model.modules() if type(m).__name__ in CKPT_BLOCKS]


def _build_run(shape: RunShape) -> tuple[nn.Module, list[nn.Module], list[nn.Parameter], Callable[[], torch.Tensor]]:
    """(all networks with grad, checkpoint units, trainable params, loss closure) under fake mode."""
    from modules.registry import build_model, model_config

    full = shape.mode == "full"
    gen_dtype = DTYPES[shape.weight_dtype] if full else DTYPES[shape.frozen_dtype]
    with _default_dtype(gen_dtype):
        generator = build_model(shape.kind, shape.model_version)
    generator.train()
    networks = nn.ModuleDict({"generator": generator})
    generator.requires_grad_(full)
    if shape.mode == "lora":
        from modules.lora import apply_lora

        for _name, lora in apply_lora(generator, list(shape.lora_filters), rank=shape.lora_rank):
            # LoRA factors train in float32 on the bf16 base (assigned, not cast: see _default_dtype)
            lora.lora_down = nn.Parameter(torch.zeros(lora.lora_down.shape, dtype=torch.float32))
            lora.lora_up = nn.Parameter(torch.zeros(lora.lora_up.shape, dtype=torch.float32))
    cnet = None
    if shape.mode == "controlnet":
        from modules.controlnet import ControlNet

        c_hidden = model_config(shape.kind, shape.model_version).get("c_hidden", [2048])[0]
        cnet = ControlNet(c_proj=c_hidden, **shape.controlnet)
        networks["controlnet"] = cnet
    trainable = [p for p in networks.parameters() if p.requires_grad]
    units = _units(generator) + (_units(cnet) if cnet is not None else [])

    b, (h, w) = shape.batch_size, shape.image_size
    kw = model_config(shape.kind, shape.model_version)
    if shape.kind == "stage_c":
        x = torch.empty(b, kw.get("c_in", 16), h // 32, w // 32)
        cond = {"clip_text": torch.empty(b, 77, kw.get("c_clip_text", 1280)),
                "clip_text_pooled": torch.empty(b, 1, kw.get("c_clip_text_pooled", 1280)),
                "clip_img": torch.empty(b, 1, kw.get("c_clip_img", 768))}
    else:
        x = torch.empty(b, kw.get("c_in", 4), h // 4, w // 4)
        cond = {"effnet": torch.empty(b, kw.get("c_effnet", 16), h // 32, w // 32),
                "clip": torch.empty(b, 1, kw.get("c_clip", 1280))}
    r = torch.empty(b)

    def run() -> torch.Tensor:
        extra = {}
        if cnet is not None:
            extra["cnet"] = cnet(torch.empty(b, shape.controlnet.get("c_in", 1), h, w))
        pred = generator(x, r, **cond, **extra)
        return (pred.float() - x.float()).pow(2).mean()

    return networks, units, trainable, run


def _encoder_params(shape: RunShape) -> dict[str, int]:
    """Frozen encoders/decoders the run loads (none when reading a cache)."""
    if shape.cached:
        return {}
    out = {"clip_text": clip_text_params(), "effnet": _meta_params("effnet")}
    if shape.kind == "stage_c":
        if shape.image_conditioning:
            out["clip_vision"] = clip_vision_params()
        out["previewer"] = _meta_params("previewer")
    else:
        out["stage_a"] = _meta_params("stage_a")
    return out


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def estimate_memory(cfg: Any = None, *, activations: bool = True, **explicit: Any) -> dict:
    """Memory estimate (bytes) of a run, from a training config or from ``RunShape`` keywords.

    Returns ``{'shape': {...}, 'params': {...}, 'bytes': {...}, 'total': int,
    'total_checkpointed': int, 'configured_checkpointing': bool}``; ``activations=False`` skips
    the fake forward (weights/grads/optimizer only, instant even for 3.6B).
    """
    configured = bool(explicit.pop("gradient_checkpointing", False))
    if cfg is not None:
        fields, configured = shape_from_config(cfg, explicit.pop("kind", None), explicit.pop("mode", None))
        fields.update(explicit)
        explicit = fields
    if isinstance(explicit.get("image_size"), int):
        explicit["image_size"] = (explicit["image_size"], explicit["image_size"])
    shape = RunShape(**explicit)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        networks, units, trainable, run = _build_run(shape)
        trainable_ids = {id(p) for p in trainable}
        gen = networks["generator"]
        trained_w = sum(p.numel() * p.element_size() for p in trainable)
        frozen_w = sum(p.numel() * p.element_size() for p in networks.parameters() if id(p) not in trainable_ids)
        frozen_w += sum(b.numel() * b.element_size() for b in networks.buffers())
        grads = trained_w
        optim = optimizer_state_bytes(trainable, shape.optimizer)
        acts = count_activations(networks, run, units, shape.autocast) if activations else ActivationCount(0, 0, 0)
        n_gen = sum(p.numel() for n, p in gen.named_parameters() if "lora_" not in n)
        n_trainable = sum(p.numel() for p in trainable)
    enc = _encoder_params(shape)
    enc_bytes = sum(enc.values()) * _dtype_bytes(shape.frozen_dtype)
    base = trained_w + frozen_w + enc_bytes + grads + optim
    parts = {"weights_trained": trained_w, "weights_frozen": frozen_w, "encoders": enc_bytes,
             "gradients": grads, "optimizer": optim, "activations": acts.full,
             "activations_checkpointed": acts.checkpointed, "backward_workspace": acts.largest_unit}
    shape_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in shape.__dict__.items()}
    return {"shape": shape_dict, "params": {"generator": n_gen, "trainable": n_trainable, **enc},
            "bytes": parts, "total": base + acts.full + acts.largest_unit,
            "total_checkpointed": base + acts.checkpointed + acts.largest_unit,
            "configured_checkpointing": configured}


def shape_from_config(cfg: Any, kind: Optional[str] = None, mode: Optional[str] = None) -> tuple[dict, bool]:
    """``RunShape`` fields of a training config (any of the job dataclasses), and whether the
    config turns checkpointing on. Keys a job does not have fall back to the defaults."""
    get = lambda key, default=None: getattr(cfg, key, default)  # noqa: E731
    if kind is None:
        kind = "stage_b" if str(get("model_version")) in ("3B", "700M") else "stage_c"
    if mode is None:
        mode = "lora" if get("module_filters") is not None or get("rank") is not None else (
            "controlnet" if get("controlnet_blocks") is not None or get("controlnet_filter") is not None else "full")
    size = get("image_size", 768)
    per_rank = cfg.per_rank_batch(1) if hasattr(cfg, "per_rank_batch") else get("batch_size", 1)
    fields = {"kind": kind, "model_version": str(get("model_version")), "mode": mode,
              "batch_size": int(per_rank), "image_size": (int(size), int(size)),
              "optimizer": get("optimizer", "adamw") or "adamw",
              "weight_dtype": get("dtype") or "float32",
              "frozen_dtype": get("frozen_dtype") or "bfloat16",
              "autocast": get("precision", "auto") != "fp32",
              "cached": bool(get("cache_path")),
              "image_conditioning": float(get("image_embed_prob", 0.1) or 0) > 0}
    if mode == "lora":
        fields["lora_rank"] = int(get("rank", 4) or 4)
        fields["lora_filters"] = tuple(get("module_filters", [".attn"]) or [".attn"])
    return fields, bool(get("gradient_checkpointing", False))


def format_estimate(est: dict) -> str:
    """A small fixed-width table (GiB) for ``--dry-run``."""
    b, s = est["bytes"], est["shape"]
    rows = [("weights (trained)", b["weights_trained"]), ("weights (frozen generator/cnet)", b["weights_frozen"]),
            ("frozen encoders", b["encoders"]), ("gradients", b["gradients"]),
            (f"optimizer states ({s['optimizer']})", b["optimizer"]),
            ("activations, no checkpointing", b["activations"]),
            ("activations, gradient checkpointing", b["activations_checkpointed"]),
            ("backward workspace", b["backward_workspace"])]
    on = est["configured_checkpointing"]
    lines = [f"# memory estimate: {s['kind']} {s['model_version']} {s['mode']}, per-GPU batch {s['batch_size']}, "
             f"{s['image_size'][0]}x{s['image_size'][1]}, weights {s['weight_dtype']}, frozen {s['frozen_dtype']}"
             f"{', from cache' if s['cached'] else ''}"]
    lines += [f"{name:<38}{val / GIB:>9.2f} GiB" for name, val in rows]
    lines.append(f"{'peak, no checkpointing' + (' ' if on else ' (configured)'):<38}{est['total'] / GIB:>9.2f} GiB")
    lines.append(f"{'peak, checkpointing' + (' (configured)' if on else ''):<38}"
                 f"{est['total_checkpointed'] / GIB:>9.2f} GiB")
    lines.append("(analytic estimate; add ~0.5 GiB CUDA context and allocator fragmentation)")
    return "\n".join(lines)


__all__ = ["RunShape", "estimate_memory", "format_estimate", "optimizer_state_bytes", "count_activations",
           "shape_from_config", "clip_text_params", "clip_vision_params", "ActivationCount"]
