"""One training step of a Stable Cascade job at full size with random weights: what
``bench/gpu.py`` times on a GPU and ``core.memsim`` simulates on a CPU (``bench/gpu.py --simulate``,
``--dry-run --simulate``), one code path for both.

A :class:`Row` says what runs (network, mode, batch, image size, dtypes, optimizer, memory
options); :func:`build_trained` / :func:`build_encoders` build its networks (full-size, from
``modules.registry``; CLIP text bigG-14 and vision ViT-L/14 from their published configurations
typed in below; nothing is downloaded or read) and :func:`training_step` runs one step: the frozen
encoders' no-grad forward (CLIP text + vision and EfficientNet for Stage C; CLIP text,
EfficientNet and Stage A for Stage B), ``gdf.diffuse``, the trained forward under bf16 autocast,
the loss of ``train/diffusion_loss.py``, backward, gradient clipping and the optimizer step
(``core.optim``). :func:`row_from_config` turns a job's config into its row, :func:`simulate_row`
simulates one.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

#: CLIP ViT-bigG-14 text tower (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k, text_config).
CLIP_TEXT_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                      projection_dim=1280)
#: CLIP ViT-L/14 vision tower (openai/clip-vit-large-patch14, vision_config).
CLIP_VISION_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
#: --quick: the same towers at test size (widths match the tiny Stage B/C conditions).
CLIP_TEXT_TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
CLIP_VISION_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=24)



@dataclass
class Row:
    """One benchmark row: a job's training step at one setting."""

    name: str
    title: str
    kind: str                       # "stage_c" | "stage_b"
    version: str                    # modules.registry model_version
    mode: str = "full"              # "full" | "lora" | "controlnet"
    batch: int = 4
    image_size: int = 1024
    checkpointing: Union[bool, int] = False  # the dial: true | N (every N-th block)
    weight_dtype: str = "float32"   # the trained network's storage dtype (full finetunes)
    optimizer: str = "adamw"
    stochastic_rounding: bool = False
    search_max_batch: bool = False  # double the batch until out of memory
    lora_rank: int = 4
    lora_filters: tuple[str, ...] = (".attn",)
    #: ControlNet kwargs except c_proj (None: the official canny one, :func:`controlnet_kwargs`)
    controlnet: Optional[dict] = None
    grad_clip: Optional[float] = 1.0
    #: conditions read from a cache (``cache_path``): no encoders loaded, no encoder step
    cached: bool = False
    #: a preset's card size (GiB) and config file
    budget_gib: Optional[float] = None
    config: Optional[str] = None
    # the low-VRAM options (core/quantize.py, core/offload.py, core/fused_backward.py); checkpointing
    # above is the dial true | N
    base_dtype: Optional[str] = None
    base_quant_block: int = 64
    offload_blocks: int = 0
    fused_backward: bool = False


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def controlnet_kwargs(row: Row) -> dict:
    """The official canny ControlNet (tiny Stage C: injected into its first two ResBlock calls)."""
    from modules.registry import model_config

    kw = dict(model_config("controlnet", "canny") if row.controlnet is None else row.controlnet)
    kw["c_proj"] = model_config(row.kind, row.version).get("c_hidden", [2048])[0]
    if row.version == "tiny":
        kw["proj_blocks"] = [0, 1]
    return kw


def _init_for_timing(name: str, x: torch.Tensor) -> None:
    if x.dim() >= 2:
        x.normal_(0.0, 0.02)
    else:  # 1-d: norm scales 1, biases 0
        x.fill_(1.0 if name == "weight" else 0.0)


def _materialize(module: nn.Module, device: Any) -> nn.Module:
    """A meta-device module given storage on ``device`` and random weights (weight tensors >= 2-d
    ~ N(0, 0.02), 1-d weights (norm scales) 1, the rest 0, BatchNorm variances 1: what a timing needs, without running
    every init function of a multi-billion-parameter network). ``device=None``: uninitialised
    storage, for FLOP counting under ``FakeTensorMode``."""
    from core.memsim import fake_materialize

    fake_materialize(module, device if device is not None else "cpu", _init_for_timing if device is not None else None)
    if device is not None:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_var.fill_(1.0)
    return module


def build_trained(row: Row, device: Any) -> tuple[nn.ModuleDict, list[nn.Parameter]]:
    """The generator (+ LoRA / ControlNet) as the job trains it, and the trained parameters."""
    from modules.registry import build_model

    frozen_base = row.mode != "full"
    with _default_dtype(torch.bfloat16 if frozen_base else _dtype(row.weight_dtype)):
        generator = _materialize(build_model(row.kind, row.version, device="meta"), device)
    nets = nn.ModuleDict({"generator": generator})
    # trained (full, LoRA inside it) in train mode; the frozen base under a ControlNet in eval mode
    generator.train(row.mode != "controlnet")
    if row.mode == "full":
        params = list(generator.parameters())
    else:
        generator.requires_grad_(False)
        params = []
    if row.mode != "full" and row.base_dtype:  # the frozen base, before adapters attach (as the jobs)
        from core.quantize import quantize_as_configured

        quantize_as_configured(generator, row)
    if row.mode == "lora":
        from train.memory_specs import float32_lora

        params += float32_lora(generator, list(row.lora_filters), row.lora_rank)  # float32 on the bf16 base, as the job
    if row.mode == "controlnet":
        from modules.controlnet import ControlNet

        with torch.device("meta"):
            cnet = ControlNet(**controlnet_kwargs(row))
        nets["controlnet"] = _materialize(cnet, device).train()
        params += list(nets["controlnet"].parameters())
    for net in nets.values():
        net.set_gradient_checkpointing(row.checkpointing)
    if row.offload_blocks:  # as core.models.ModelSet.offload: blocks holding frozen weights
        from core.offload import offload_blocks_
        from modules.common import BLOCK_TYPES

        for net in nets.values():
            blocks = [m for m in net.modules() if isinstance(m, BLOCK_TYPES)]
            if any(not p.requires_grad for b in blocks for p in b.parameters()):
                offload_blocks_(blocks, row.offload_blocks, torch.device(device if device is not None else "cpu"))
    return nets, params


def build_encoders(row: Row, device: Any, quick: bool) -> dict[str, nn.Module]:
    """The frozen parts the job runs every step, random weights, bf16 (Stage A float32, as registered)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from modules.registry import build_model

    out: dict[str, nn.Module] = {}
    # CLIP is built where it runs (its integer position ids must be real); the convolutional
    # encoders on the meta device, then given random weights (no init functions: seconds per row)
    with torch.device(device if device is not None else "cpu"), _default_dtype(torch.bfloat16):
        out["text"] = CLIPTextModelWithProjection(CLIPTextConfig(**(CLIP_TEXT_TINY if quick else CLIP_TEXT_BIGG)))
        if row.kind == "stage_c":
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            out["vision"] = CLIPVisionModelWithProjection(
                CLIPVisionConfig(**(CLIP_VISION_TINY if quick else CLIP_VISION_L14)))
    with torch.device("meta"), _default_dtype(torch.bfloat16):
        out["effnet"] = _materialize(build_model("effnet", "default"), device)
    if row.kind == "stage_b":
        with torch.device("meta"):
            out["stage_a"] = _materialize(build_model("stage_a", "default"), device)  # float32, as the job has it
    for name, m in out.items():
        out[name] = m.requires_grad_(False).eval()
    if row.base_dtype:  # the jobs store the CLIP text encoder in base_dtype too
        from core.quantize import quantize_as_configured

        quantize_as_configured(out["text"], row)
    return out


# ------------------------------------------------------------------------------------------------
# one training step
# ------------------------------------------------------------------------------------------------
def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _encode(row: Row, enc: dict[str, nn.Module], images: torch.Tensor, device: torch.device
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x0, conditions) of a batch of [0,1] images, no grad, as the jobs compute them."""
    from modules.conditioning import clip_preprocess
    from modules.effnet import imagenet_normalize

    b = images.shape[0]
    text = enc["text"]
    ids = torch.randint(0, text.config.vocab_size, (b, 77), device=device)
    out = text(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    effnet = enc["effnet"]

    def latents_of(x: torch.Tensor) -> torch.Tensor:
        x = imagenet_normalize(x.float()).contiguous(memory_format=torch.channels_last)
        return effnet(x.to(torch.bfloat16)).float()

    if row.kind == "stage_c":
        vision = enc["vision"]
        pixels = clip_preprocess(images, size=int(vision.config.image_size)).to(torch.bfloat16)
        cond = {"clip_text": out.hidden_states[-1].float(), "clip_text_pooled": out.text_embeds.unsqueeze(1).float(),
                "clip_img": vision(pixel_values=pixels).image_embeds.unsqueeze(1).float()}
        return latents_of(images), cond
    h, w = images.shape[-2:]
    small = torch.nn.functional.interpolate(images, size=(max(32, h * 3 // 4 // 32 * 32), max(32, w * 3 // 4 // 32 * 32)),
                                            mode="nearest")
    cond = {"effnet": latents_of(small), "clip": out.text_embeds.unsqueeze(1).float()}
    return enc["stage_a"].encode(images.float())[0].float(), cond


def _canny_input(images: torch.Tensor) -> torch.Tensor:
    # the control image's cost is the filter's (CPU, in the data step of the job); a grey image
    # stands in for it here
    return images.mean(1, keepdim=True)


def trained_loss(row: Row, nets: nn.ModuleDict, noised: torch.Tensor, noise_cond: torch.Tensor,
                 cond: dict[str, torch.Tensor], images: Optional[torch.Tensor], device: torch.device
                 ) -> torch.Tensor:
    """The trained networks' forward under bf16 autocast -> per-sample MSE (batch mean)."""
    extra = {}
    with _autocast(device):
        if "controlnet" in nets:
            extra["cnet"] = nets["controlnet"](_canny_input(images))
        pred = nets["generator"](noised, noise_cond, **cond, **extra)
    return (pred.float() - noised.float()).pow(2).mean()


def train_forward(row: Row, nets: nn.ModuleDict, x0: torch.Tensor, cond: dict[str, torch.Tensor],
                  images: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """diffuse -> trained forward under bf16 autocast -> the job's loss (train/diffusion_loss.py)."""
    import gdf.presets
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from train.diffusion_loss import DiffusionLoss

    with unset_fake_temporarily():  # its constants hold numbers (a simulation's fake tensors do not)
        schedule = gdf.presets.stage_c() if row.kind == "stage_c" else gdf.presets.stage_b()
    loss_fn = DiffusionLoss(schedule, defer=lambda fn: fn(), autocast=lambda: _autocast(device))
    extra = {}
    if "controlnet" in nets:
        with _autocast(device):
            extra["cnet"] = nets["controlnet"](_canny_input(images))
    generators = [torch.Generator().manual_seed(i) for i in range(x0.shape[0])]
    loss, _ = loss_fn(lambda x, r: nets["generator"](x, r, **cond, **extra), x0, generators)
    return loss


def make_optimizer(row: Row, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The job's optimizer (core.optim); with ``fused_backward`` its per-parameter hooks
    (core/fused_backward.py) are attached and kept as ``opt._bench_fused``."""
    from core.optim import OptimConfig, build_optimizer

    cfg = OptimConfig()
    cfg.optimizer, cfg.stochastic_rounding = row.optimizer, row.stochastic_rounding
    opt = build_optimizer(params, 1e-5, cfg)
    if row.fused_backward:
        from core.fused_backward import FusedBackward

        opt._bench_fused = FusedBackward(opt, params)  # type: ignore[attr-defined]
    return opt



def _encoded_stand_in(row: Row, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A cached run's batch: latents and conditions as read from the cache (float32, random)."""
    from modules.registry import model_config

    kw, b, s = model_config(row.kind, row.version), images.shape[0], row.image_size
    dev = images.device
    if row.kind == "stage_c":
        return torch.randn(b, kw.get("c_in", 16), s // 32, s // 32, device=dev), {
            "clip_text": torch.randn(b, 77, kw.get("c_clip_text", 1280), device=dev),
            "clip_text_pooled": torch.randn(b, 1, kw.get("c_clip_text_pooled", 1280), device=dev),
            "clip_img": torch.randn(b, 1, kw.get("c_clip_img", 768), device=dev)}
    return torch.randn(b, kw.get("c_in", 4), s // 4, s // 4, device=dev), {
        "effnet": torch.randn(b, kw.get("c_effnet", 16), s * 3 // 4 // 32, s * 3 // 4 // 32, device=dev),
        "clip": torch.randn(b, 1, kw.get("c_clip", 1280), device=dev)}


def training_step(row: Row, nets: nn.ModuleDict, params: list, opt: torch.optim.Optimizer,
                  enc: dict[str, nn.Module], images: torch.Tensor, device: torch.device,
                  phase: Callable[[str], None] = lambda _name: None) -> None:
    """One training step on a batch of [0, 1] images; ``phase(name)`` is told what runs next
    (encode, forward, backward, clip, optimizer), for the simulation's accounting."""
    phase("encode")
    with torch.no_grad():
        x0, cond = _encoded_stand_in(row, images) if row.cached else _encode(row, enc, images, device)
    phase("forward")
    loss = train_forward(row, nets, x0, cond, images, device)
    phase("backward")
    loss.backward()  # fused_backward: each parameter is stepped (and its gradient freed) in here
    del loss, x0, cond
    fused = getattr(opt, "_bench_fused", None)
    if fused is not None:
        fused.finish()
    else:
        phase("clip")
        if row.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, row.grad_clip)
        phase("optimizer")
        opt.step()
    opt.zero_grad(set_to_none=True)
    phase("done")


def simulate_row(row: Row, fake: bool = True) -> Any:
    """``core.memsim.simulate`` of one step of ``row`` (full size on fake tensors; ``fake=False``
    runs it on real CPU tensors, for tiny rows)."""
    from core.memsim import SimJob, optimizer_warmup, simulate

    cpu = torch.device("cpu")

    def build() -> SimJob:
        enc = {} if row.cached else build_encoders(row, cpu if not fake else None, quick=row.version == "tiny")
        nets, params = build_trained(row, cpu if not fake else None)
        opt = make_optimizer(row, params)

        def step(phases) -> None:
            images = torch.rand(row.batch, 3, row.image_size, row.image_size)
            training_step(row, nets, params, opt, enc, images, cpu, phases)

        return SimJob(modules=[nets, *enc.values()], params=params, optimizer=opt, step=step,
                      warmup=optimizer_warmup(opt, params))

    return simulate(build, fake=fake)


# ------------------------------------------------------------------------------------------------
# a job's config as a row (presets, --dry-run --simulate)
# ------------------------------------------------------------------------------------------------
#: training script (train/<name>.py) -> (network kind, mode)
JOB_MODES = {"train_c": ("stage_c", "full"), "train_b": ("stage_b", "full"),
             "train_c_lora": ("stage_c", "lora"), "train_c_controlnet": ("stage_c", "controlnet")}


def _controlnet_of(cfg: Any) -> dict:
    """ControlNet kwargs (except c_proj) of a ControlNet job's config, as its job builds them."""
    from modules import filters

    cls = filters.FILTERS.get(cfg.controlnet_filter)
    # the control input's channels: every filter's num_channels reads class constants only
    c_in = int(cls.num_channels(cls)) if cls is not None else 1
    kw = {"c_in": c_in, "proj_blocks": list(cfg.controlnet_blocks)}
    if cfg.controlnet_bottleneck_mode:
        kw["bottleneck_mode"] = cfg.controlnet_bottleneck_mode
    return kw


def row_from_config(script: str, cfg: Any, world_size: int = 1, name: Optional[str] = None,
                    budget_gib: Optional[float] = None, config: Optional[str] = None) -> Row:
    """The row of one rank of a run of ``train/<script>.py`` with the (validated) config ``cfg``."""
    kind, mode = JOB_MODES[script]
    g = lambda key, default=None: getattr(cfg, key, default)  # noqa: E731
    row = Row(name=name or str(g("experiment_id", script)), title=str(g("experiment_id", script)), kind=kind,
              version=str(g("model_version")), mode=mode, batch=int(cfg.per_rank_batch(world_size)),
              image_size=int(g("image_size", 768)), checkpointing=g("gradient_checkpointing", False) or False,
              weight_dtype=(g("dtype") or "float32") if mode == "full" else "bfloat16",
              optimizer=g("optimizer", "adamw") or "adamw", stochastic_rounding=bool(g("stochastic_rounding", False)),
              grad_clip=g("grad_clip", 1.0), cached=bool(g("cache_path")), budget_gib=budget_gib, config=config,
              base_dtype=g("base_dtype"), base_quant_block=int(g("base_quant_block", 64)),
              offload_blocks=int(g("offload_blocks", 0) or 0), fused_backward=bool(g("fused_backward", False)))
    if mode == "lora":
        row = replace(row, lora_rank=int(g("rank", 4) or 4), lora_filters=tuple(g("module_filters") or [".attn"]))
    if mode == "controlnet":
        row = replace(row, controlnet=_controlnet_of(cfg))
    return row


#: the header lines of a preset config (configs/training/*.yaml)
PRESET_JOB = re.compile(r"^#\s*job:\s*train/(\w+)\.py", re.M)
PRESET_BUDGET = re.compile(r"^#\s*budget_gib:\s*([0-9.]+)", re.M)


def script_of(trainer: type) -> str:
    """The training script (``train/<name>.py`` stem) that defines ``trainer`` or its nearest base."""
    import sys

    for cls in trainer.__mro__:
        module = sys.modules.get(cls.__module__)
        stem = os.path.splitext(os.path.basename(getattr(module, "__file__", "") or ""))[0]
        if stem in JOB_MODES:
            return stem
    raise ValueError(f"{trainer.__name__} is not a training job of {sorted(JOB_MODES)}")


def trainer_of(script: str) -> type:
    """The trainer class ``train/<script>.py`` defines."""
    import importlib
    import inspect

    from core.training import TrainingCore

    module = importlib.import_module(f"train.{script}")
    found = [c for _, c in inspect.getmembers(module, inspect.isclass)
             if issubclass(c, TrainingCore) and c.__module__ == module.__name__]
    if len(found) != 1:
        raise ValueError(f"train/{script}.py defines {len(found)} trainers")
    return found[0]


def preset_rows(folder: Optional[str] = None) -> list[Row]:
    """One row per preset under ``configs/training/``: a config whose header names its job
    (``# job: train/<script>.py``) and its card size (``# budget_gib: N``); named ``preset:<stem>``."""
    from core.config import load_config

    folder = folder or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "training")
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        job, budget = PRESET_JOB.search(text), PRESET_BUDGET.search(text)
        if not (job and budget):
            continue
        cfg = load_config(trainer_of(job.group(1)).Config, path, validate_only=True, world_size=1)
        stem = os.path.splitext(os.path.basename(path))[0]
        row = row_from_config(job.group(1), cfg, 1, name=f"preset:{stem}", budget_gib=float(budget.group(1)),
                              config=path)
        rows.append(replace(row, title=f"preset {stem} ({budget.group(1)} GB card)"))
    return rows
