"""The memory specs of the four training jobs: what each run builds, trains and keeps loaded.

``core.memory`` estimates any run from a :class:`core.memory.MemorySpec`; this module says what a
Stable Cascade run is, from the job's config (the dataclass ``core.config.load_config`` returns for
the job's Config class; any object with the same attributes works, missing keys take the job
defaults) and the run's world size (the launcher's, ``core.distributed.world_size_from_env``).
Every spec is what ONE rank holds: the per-rank micro-batch ``batch_size / (world_size *
grad_accum_steps)``, and with ``use_fsdp`` on several ranks the networks of
:data:`FSDP_SHARDED` sharded over them:

* :func:`stage_c_spec` - Stage C full finetune (``train/train_c.py``);
* :func:`stage_b_spec` - Stage B full finetune (``train/train_b.py``);
* :func:`lora_spec` - LoRA on a frozen Stage C (``train/train_c_lora.py``);
* :func:`controlnet_spec` - ControlNet on a frozen Stage C (``train/train_c_controlnet.py``).

The frozen encoders (CLIP text/vision, EfficientNet, Previewer, Stage A) are counted, not built:
CLIP from its config formulas (a dry run must not download 1.4 GB to print a number), the others
on the meta device. A cached run (``cache_path``) loads none of them.

The dtypes are those of the run on its target device, a CUDA GPU with bfloat16 (the dry run itself
usually runs elsewhere, e.g. a CPU login node, where the run would choose float32): frozen networks
in ``frozen_dtype`` (unset: bfloat16, core.precision), Stage A in float32 (the jobs register it
uncast), the trained network in ``dtype`` (unset: float32), the forward under bf16 autocast unless
``precision: fp32``.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from core.config import per_rank_batch
from core.memory import MemorySpec, default_dtype
from modules.common import checkpoint_every

#: The low-VRAM settings every spec carries in its ``details`` (see :func:`_run_fields`).
LOW_VRAM_FIELDS = ("checkpoint_every", "base_dtype", "base_quant_block", "offload_blocks", "fused_backward")
#: Official ControlNet 3.6B injection points (docs/OFFICIAL.md, ControlNet: canny/inpainting/SR).
CNET_PROJ_BLOCKS = [0, 4, 8, 12, 51, 55, 59, 63]
#: The ControlNet the estimate builds unless told otherwise: the official canny one.
DEFAULT_CONTROLNET = {"c_in": 1, "proj_blocks": CNET_PROJ_BLOCKS, "bottleneck_mode": "effnet"}
#: Per spec mode, the networks FSDP2 shards with ``use_fsdp`` on several ranks: the trained
#: generator, and for the adapter jobs the frozen base with the adapter (issue 12: "FSDP2 shards
#: the frozen base"); the encoders stay whole on every rank.
FSDP_SHARDED = {"full": ("generator",), "lora": ("generator",), "controlnet": ("generator", "controlnet")}


# ------------------------------------------------------------------------------------------------
# Parameter counts of the frozen encoders
# ------------------------------------------------------------------------------------------------
def clip_text_params(width: int = 1280, layers: int = 32, mlp: int = 5120, vocab: int = 49408,
                     positions: int = 77, projection: int = 1280) -> int:
    """CLIPTextModelWithProjection parameters from its config (bigG-14 defaults: 694,659,840).
    Computed, not loaded: a dry run must not download 1.4 GB to print a number."""
    layer = 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 4 * width
    return vocab * width + positions * width + layers * layer + 2 * width + width * projection


def _clip_text_quantised(block: int) -> tuple[int, str]:
    """CLIP text bigG with ``base_dtype``: its linear weights in 8 bits + a float32 scale per
    ``block`` (0 = per row), the rest in bf16; as ``(bytes, "uint8")`` (one byte per "parameter")."""
    width, layers, mlp, projection = 1280, 32, 5120, 1280
    linear = layers * (4 * width * width + 2 * width * mlp) + width * projection
    per_scale = block if block > 0 else width
    stored = linear * (1 + 4 / per_scale) + (clip_text_params() - linear) * 2
    return int(stored), "uint8"


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


# ------------------------------------------------------------------------------------------------
# What every job's config decides
# ------------------------------------------------------------------------------------------------
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default)


def _per_rank_batch(cfg: Any, world_size: int) -> int:
    """Images one rank runs per micro-step (:func:`core.config.per_rank_batch`)."""
    return per_rank_batch(int(_get(cfg, "batch_size", 1)), world_size, int(_get(cfg, "grad_accum_steps", 1) or 1))


def _target_device(cfg: Any) -> str:
    """What the dtypes assume, in words (printed with the estimate)."""
    precision = _get(cfg, "precision", "auto") or "auto"
    compute = {"fp32": "fp32 forward", "fp16": "fp16 autocast"}.get(precision, "bf16 autocast")
    frozen = _get(cfg, "frozen_dtype")
    frozen_text = f"frozen_dtype {frozen}" if frozen else "frozen_dtype unset: bfloat16"
    return f"CUDA GPU with bf16 (precision {precision}: {compute}; {frozen_text})"


def _run_fields(cfg: Any, world_size: int = 1) -> dict[str, Any]:
    """Batch, size, dtypes, optimizer and flags of a training config (any of the job dataclasses)
    for one rank of a ``world_size``-rank run."""
    size = int(_get(cfg, "image_size", 768))
    return {"model_version": str(_get(cfg, "model_version")), "batch_size": _per_rank_batch(cfg, world_size),
            "image_size": (size, size), "optimizer": _get(cfg, "optimizer", "adamw") or "adamw",
            "weight_dtype": _get(cfg, "dtype") or "float32",
            # stochastic rounding steps bf16 weights in float32: the optimizer keeps float32 states
            "optimizer_state_dtype": "float32" if _get(cfg, "stochastic_rounding", False) else None,
            "frozen_dtype": _get(cfg, "frozen_dtype") or "bfloat16",
            "autocast": _get(cfg, "precision", "auto") != "fp32",
            "cached": bool(_get(cfg, "cache_path")),
            "image_conditioning": float(_get(cfg, "image_embed_prob", 0.1) or 0) > 0,
            "gradient_checkpointing": bool(_get(cfg, "gradient_checkpointing", False)),
            # the dial's period (modules.common.checkpoint_every): 1 = every block, N = every N-th
            "checkpoint_every": checkpoint_every(_get(cfg, "gradient_checkpointing", False)),
            # the low-VRAM options (modules/quantize.py, core/offload.py, core/fused_backward.py), passed on in
            # the spec's details for the estimate and the simulation to read
            "base_dtype": _get(cfg, "base_dtype"), "base_quant_block": int(_get(cfg, "base_quant_block", 64) or 0),
            "offload_blocks": int(_get(cfg, "offload_blocks", 0) or 0),
            "fused_backward": bool(_get(cfg, "fused_backward", False)),
            "world_size": int(world_size), "fsdp": bool(_get(cfg, "use_fsdp", False)) and world_size > 1,
            "device": _target_device(cfg),
            "clip_text": _local_clip_sizes(_get(cfg, "clip_text_model_name"), vision=False),
            "clip_vision": _local_clip_sizes(_get(cfg, "clip_image_model_name"), vision=True)}


def _local_clip_sizes(name: Any, vision: bool) -> dict[str, int]:
    """The size arguments of :func:`clip_text_params` / :func:`clip_vision_params` from a LOCAL CLIP
    folder's config.json (a tiny test CLIP counts as tiny); {} (the official bigG / ViT-L sizes) for
    a Hugging Face name or a folder without one. Read, never downloaded."""
    import json
    import os

    path = os.path.join(str(name), "config.json") if isinstance(name, str) else ""
    try:
        with open(path, encoding="utf-8") as fh:
            c = json.load(fh)
    except (OSError, ValueError):
        return {}
    c = c.get("vision_config", c) if vision else c.get("text_config", c)
    try:
        sizes = {"width": int(c["hidden_size"]), "layers": int(c["num_hidden_layers"]),
                 "mlp": int(c["intermediate_size"])}
        if "projection_dim" in c:
            sizes["projection"] = int(c["projection_dim"])
        if vision:
            sizes.update(patch=int(c.get("patch_size", 14)), image=int(c.get("image_size", 224)))
        else:
            sizes.update(vocab=int(c.get("vocab_size", 49408)), positions=int(c.get("max_position_embeddings", 77)))
    except (KeyError, TypeError, ValueError):
        return {}
    return sizes


def _encoders(kind: str, f: dict[str, Any]) -> dict[str, Any]:
    """Parameter counts of the frozen encoders/decoders the run loads (none when reading a cache)."""
    if f["cached"]:
        return {}
    out: dict[str, Any] = {"clip_text": clip_text_params(**f["clip_text"]), "effnet": _meta_params("effnet")}
    if f["base_dtype"]:  # the jobs store the text encoder's linear weights quantised too
        out["clip_text"] = _clip_text_quantised(f["base_quant_block"])
    if kind == "stage_c":
        out["clip_vision"] = clip_vision_params(**f["clip_vision"])  # loaded whatever image_embed_prob says
        out["previewer"] = _meta_params("previewer")
    else:
        out["stage_a"] = (_meta_params("stage_a"), "float32")  # registered uncast (decode only)
    return out


def _checkpointed_units(every: int, blocks: list) -> list:
    """The blocks the checkpointing dial recomputes (all of them when it is off: the estimate
    reports both figures)."""
    from modules.common import checkpointed_blocks

    return [blk for blk, on in zip(blocks, checkpointed_blocks(len(blocks), every or 1)) if on]


def _encoder_forward(kind: str, b: int, h: int, w: int, frozen_dtype: str) -> None:
    """The convolutional encoders' no-grad forward of one step (under the caller's fake mode):
    EfficientNet on the images (Stage C) or on 3/4-size images + Stage A's encoder in float32
    (Stage B). CLIP's 77-token forwards are small and not built here."""
    from modules.registry import build_model

    from core.memsim import fake_materialize

    with default_dtype(frozen_dtype):
        effnet = fake_materialize(build_model("effnet", "default", device="meta")).eval()
    images = torch.empty(b, 3, h, w)
    if kind == "stage_c":
        effnet(images.to(_dtype_of(effnet)).contiguous(memory_format=torch.channels_last))
        return
    small = torch.empty(b, 3, max(32, h * 3 // 4 // 32 * 32), max(32, w * 3 // 4 // 32 * 32))
    effnet(small.to(_dtype_of(effnet)).contiguous(memory_format=torch.channels_last))
    del effnet, small
    stage_a = fake_materialize(build_model("stage_a", "default", device="meta")).eval()
    stage_a.encode(images)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _generator_inputs(kind: str, version: str, b: int, h: int, w: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(noised latent, conditions) of one training step at batch ``b`` and image size ``h x w``."""
    from modules.registry import model_config

    kw = model_config(kind, version)
    if kind == "stage_c":
        x = torch.empty(b, kw.get("c_in", 16), h // 32, w // 32)
        cond = {"clip_text": torch.empty(b, 77, kw.get("c_clip_text", 1280)),
                "clip_text_pooled": torch.empty(b, 1, kw.get("c_clip_text_pooled", 1280)),
                "clip_img": torch.empty(b, 1, kw.get("c_clip_img", 768))}
    else:
        x = torch.empty(b, kw.get("c_in", 4), h // 4, w // 4)
        cond = {"effnet": torch.empty(b, kw.get("c_effnet", 16), h // 32, w // 32),
                "clip": torch.empty(b, 1, kw.get("c_clip", 1280))}
    return x, cond


def _spec(cfg: Any, kind: str, mode: str, world_size: int = 1, lora: Optional[dict] = None,
          controlnet: Optional[dict] = None) -> MemorySpec:
    """The spec of one rank of a generator run: ``mode`` 'full' trains the generator; 'lora' trains
    adapters on it frozen (``lora``: :func:`float32_lora` keywords filters, rank, lora_type and the
    kind's options); 'controlnet' trains a ControlNet (``controlnet`` kwargs) that feeds it frozen."""
    from modules.common import BLOCK_TYPES
    from modules.registry import build_model, model_config

    f = _run_fields(cfg, world_size)
    version = f["model_version"]
    b, (h, w) = f["batch_size"], f["image_size"]
    full = mode == "full"

    def build() -> nn.Module:
        with default_dtype(f["weight_dtype"] if full else f["frozen_dtype"]):
            generator = build_model(kind, version)
        # trained (or LoRA-adapted) in train mode; the frozen base under a ControlNet in eval mode
        # (no dropout), as the ControlNet job registers it
        generator.train(controlnet is None)
        networks = nn.ModuleDict({"generator": generator})
        generator.requires_grad_(full)
        if not full and f["base_dtype"]:  # the frozen base quantised before adapters attach, as the jobs
            from core.quantize import quantize_as_configured

            quantize_as_configured(generator, SimpleNamespace(base_dtype=f["base_dtype"],
                                                              base_quant_block=f["base_quant_block"]))
        if lora is not None:
            float32_lora(generator, **lora)
        if controlnet is not None:
            from modules.controlnet import ControlNet

            c_hidden = model_config(kind, version).get("c_hidden", [2048])[0]
            kwargs = {k: v for k, v in controlnet.items() if k != "input_downscale"}
            networks["controlnet"] = ControlNet(c_proj=c_hidden, **kwargs)  # trains in float32
        return networks

    def forward(networks: nn.Module) -> torch.Tensor:
        x, cond = _generator_inputs(kind, version, b, h, w)
        r = torch.empty(b)
        extra = {}
        if "controlnet" in networks:
            # the filter's control image: image-sized, or latent-sized (input_downscale 32: the SR filter's latent)
            down = int(controlnet.get("input_downscale", 1))
            extra["cnet"] = networks["controlnet"](torch.empty(b, controlnet.get("c_in", 1), h // down, w // down))
        pred = networks["generator"](x, r, **cond, **extra)
        return (pred.float() - x.float()).pow(2).mean()

    def cnet_units(networks: nn.Module) -> list[nn.Module]:
        # ControlNet.set_gradient_checkpointing recomputes its top-level backbone stages and projections.
        cnet = networks["controlnet"]
        return list(cnet.backbone) + list(cnet.projections)

    def param_counts(networks: nn.Module) -> dict[str, int]:
        # the base generator, without the adapters parametrizing it
        from modules.adapters import Adapter

        generator = networks["generator"]
        adapted = {id(p) for m in generator.modules() if isinstance(m, Adapter) for p in m.parameters()}
        return {"generator": sum(p.numel() for p in generator.parameters() if id(p) not in adapted)}

    details: dict[str, Any] = {"kind": kind, "model_version": version, "mode": mode,
                               **{k: f[k] for k in LOW_VRAM_FIELDS}}
    if lora is not None:
        details.update(lora_rank=lora["rank"], lora_filters=list(lora["filters"]), lora_type=lora["lora_type"])
    if controlnet is not None:
        details["controlnet"] = dict(controlnet)
    if kind == "stage_c":
        details["image_conditioning"] = f["image_conditioning"]
    return MemorySpec(
        title=f"{kind} {version} {mode}", build=build, forward=forward, batch_size=b, image_size=(h, w),
        unit_types=BLOCK_TYPES, extra_units=cnet_units if controlnet is not None else None,
        frozen=_encoders(kind, f), weight_dtype=f["weight_dtype"], frozen_dtype=f["frozen_dtype"],
        optimizer=f["optimizer"], optimizer_state_dtype=f["optimizer_state_dtype"],
        transient=None if f["cached"] else functools.partial(_encoder_forward, kind, b, h, w, f["frozen_dtype"]),
        unit_filter=functools.partial(_checkpointed_units, f["checkpoint_every"]),
        offload_blocks=f["offload_blocks"], fused_backward=f["fused_backward"],
        autocast=f["autocast"], gradient_checkpointing=f["gradient_checkpointing"],
        cached=f["cached"], param_counts=param_counts, frozen_label="weights (frozen generator/cnet)",
        details=details, world_size=f["world_size"], fsdp_networks=FSDP_SHARDED[mode] if f["fsdp"] else None,
        device=f["device"])


# ------------------------------------------------------------------------------------------------
# The four jobs
# ------------------------------------------------------------------------------------------------
def stage_c_spec(cfg: Any, world_size: int = 1) -> MemorySpec:
    """Stage C full finetune, one of ``world_size`` ranks: the generator trains in ``dtype``; CLIP
    text + vision, EfficientNet and Previewer are loaded frozen unless ``cache_path``."""
    return _spec(cfg, "stage_c", "full", world_size)


def stage_b_spec(cfg: Any, world_size: int = 1) -> MemorySpec:
    """Stage B full finetune, one of ``world_size`` ranks: the generator trains in ``dtype``; CLIP
    text and EfficientNet (frozen dtype) and Stage A (float32) are loaded unless ``cache_path``."""
    return _spec(cfg, "stage_b", "full", world_size)


def lora_spec(cfg: Any, world_size: int = 1) -> MemorySpec:
    """LoRA (``rank``, ``module_filters``) in float32 on a Stage C frozen in ``frozen_dtype``, one of
    ``world_size`` ranks; encoders as in :func:`stage_c_spec`. CLIP activations of trained tokens
    are not counted."""
    rank = int(_get(cfg, "rank", 4) or 4)
    filters = tuple(_get(cfg, "module_filters", [".attn"]) or [".attn"])
    from modules.adapters import kind

    lora_type = str(_get(cfg, "lora_type", "lora") or "lora")
    return _spec(cfg, "stage_c", "lora", world_size,
                 lora=dict(filters=filters, rank=rank, lora_type=lora_type, **kind(lora_type).options_from(cfg)))


def float32_lora(generator: nn.Module, filters: Sequence[str], rank: int, lora_type: str = "lora",
                 **options: Any) -> list[nn.Parameter]:
    """Attach the LoRA job's adapters (``modules.lora.apply_lora``, kind ``lora_type`` with its
    ``options``) to a frozen ``generator``, their parameters in float32 as the job trains them on a
    bf16 base; returns those trainable parameters. Assigned, not cast: the module of a
    parametrization cannot be cast in place on a meta or fake build. (The memory estimate and
    bench/gpu.py build with it.)"""
    from modules.lora import apply_lora

    params: list[nn.Parameter] = []
    for _name, module in apply_lora(generator, list(filters), rank=rank, lora_type=lora_type, **options):
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().float()))
        params += list(module.parameters(recurse=False))
    return params


def lora_parameter_count(shapes: Mapping[str, Sequence[int]], rank: int, lora_type: str = "lora",
                         **options: Any) -> int:
    """Trainable parameters of the adapters :func:`float32_lora` attaches to the weights of
    ``shapes`` (target -> weight shape), each kind's own count (``Adapter.param_count``: e.g. a
    LoRA ``rank x (out + in)``, a DoRA + ``out``). Counted without building the model (the dry run)."""
    from modules.lora import adapter_param_count

    return adapter_param_count(dict(shapes), list(shapes), lora_type, rank, **options)


def controlnet_spec(cfg: Any, world_size: int = 1, *, controlnet: Optional[dict] = None) -> MemorySpec:
    """A float32 ControlNet feeding a Stage C frozen in ``frozen_dtype``, one of ``world_size`` ranks;
    encoders as in :func:`stage_c_spec`. The ControlNet is ``controlnet`` (ControlNet kwargs except
    ``c_proj``, which is the generator's width, plus ``input_downscale``: the control image's
    size divisor, 32 for a filter that gives Stage C latents), by default the official canny one
    (:data:`DEFAULT_CONTROLNET`) whatever the config's filter and blocks, as the estimate has always done."""
    return _spec(cfg, "stage_c", "controlnet", world_size, controlnet=dict(controlnet or DEFAULT_CONTROLNET))


__all__ = ["stage_c_spec", "stage_b_spec", "lora_spec", "controlnet_spec", "float32_lora", "lora_parameter_count",
           "clip_text_params", "clip_vision_params", "CNET_PROJ_BLOCKS", "DEFAULT_CONTROLNET", "FSDP_SHARDED"]
