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
    checkpointing: bool = False
    weight_dtype: str = "float32"   # the trained network's storage dtype (full finetunes)
    optimizer: str = "adamw"
    stochastic_rounding: bool = False
    search_max_batch: bool = False  # double the batch until out of memory
    lora_rank: int = 4



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

    kw = dict(model_config("controlnet", "canny"))
    kw["c_proj"] = model_config(row.kind, row.version).get("c_hidden", [2048])[0]
    if row.version == "tiny":
        kw["proj_blocks"] = [0, 1]
    return kw


def _materialize(module: nn.Module, device: Any) -> nn.Module:
    """A meta-device module given storage on ``device`` and random weights (weight tensors >= 2-d
    ~ N(0, 0.02), 1-d weights (norm scales) 1, the rest 0, BatchNorm variances 1: what a timing needs, without running
    every init function of a multi-billion-parameter network). ``device=None``: uninitialised
    storage, for FLOP counting under ``FakeTensorMode`` (tensors are replaced, not swapped, which
    fake tensors do not allow)."""
    new: dict[int, torch.Tensor] = {}   # id -> replacement, so shared tensors stay shared
    dev = device if device is not None else "cpu"
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is None:
                    continue
                if id(t) not in new:
                    x = torch.empty(t.shape, dtype=t.dtype, device=dev)
                    if device is not None and x.is_floating_point():
                        with torch.no_grad():
                            if x.dim() >= 2:
                                x.normal_(0.0, 0.02)
                            else:  # 1-d: norm scales 1, biases 0
                                x.fill_(1.0 if k == "weight" else 0.0)
                    new[id(t)] = nn.Parameter(x, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else x
                table[k] = new[id(t)]
        if device is not None and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
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
    if row.mode == "lora":
        from modules.lora import apply_lora

        for _name, module in apply_lora(generator, [".attn"], rank=row.lora_rank):
            # the LoRA factors train in float32 on the bf16 base, as the job does (assigned: a
            # parametrization's module cannot be cast in place)
            module.lora_down = nn.Parameter(module.lora_down.detach().float())
            module.lora_up = nn.Parameter(module.lora_up.detach().float())
            params += [module.lora_down, module.lora_up]
    if row.mode == "controlnet":
        from modules.controlnet import ControlNet

        with torch.device("meta"):
            cnet = ControlNet(**controlnet_kwargs(row))
        nets["controlnet"] = _materialize(cnet, device).train()
        params += list(nets["controlnet"].parameters())
    for net in nets.values():
        net.set_gradient_checkpointing(row.checkpointing)
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
    from core.optim import OptimConfig, build_optimizer

    cfg = OptimConfig()
    cfg.optimizer, cfg.stochastic_rounding = row.optimizer, row.stochastic_rounding
    return build_optimizer(params, 1e-5, cfg)



def training_step(row: Row, nets: nn.ModuleDict, params: list, opt: torch.optim.Optimizer,
                  enc: dict[str, nn.Module], images: torch.Tensor, device: torch.device,
                  phase: Callable[[str], None] = lambda _name: None) -> None:
    """One training step on a batch of [0, 1] images; ``phase(name)`` is told what runs next
    (encode, forward, backward, clip, optimizer), for the simulation's accounting."""
    phase("encode")
    with torch.no_grad():
        x0, cond = _encode(row, enc, images, device)
    phase("forward")
    loss = train_forward(row, nets, x0, cond, images, device)
    phase("backward")
    loss.backward()
    del loss, x0, cond
    phase("clip")
    torch.nn.utils.clip_grad_norm_(params, 1.0)
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
        enc = build_encoders(row, cpu if not fake else None, quick=row.version == "tiny")
        nets, params = build_trained(row, cpu if not fake else None)
        opt = make_optimizer(row, params)

        def step(phases) -> None:
            images = torch.rand(row.batch, 3, row.image_size, row.image_size)
            training_step(row, nets, params, opt, enc, images, cpu, phases)

        return SimJob(modules=[nets, *enc.values()], params=params, optimizer=opt, step=step,
                      warmup=optimizer_warmup(opt, params))

    return simulate(build, fake=fake)
