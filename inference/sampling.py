"""Sampling one stage of the cascade: shared by the inference pipeline AND the training previews.

Only torch, tqdm and ``gdf`` are imported here (no CLIP, no core) so that the training loop can
call :func:`sample_stage_c` / :func:`sample_stage_b` and get exactly the image the pipeline gives
for the same models, conditions, settings and seed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

CfgValue = Union[float, Sequence[float], None]

# Compression factors of the official inference helper (docs/OFFICIAL.md, Inference recipes).
STAGE_C_COMPRESSION = 42.67
STAGE_A_COMPRESSION = 4.0


@dataclass(frozen=True)
class SamplingSettings:
    """The knobs of ``GDF.sample`` for one stage (docs/OFFICIAL.md, The sampling loop)."""

    timesteps: int
    cfg: CfgValue
    shift: float = 1.0
    sampler: str = "ddpm"
    t_start: float = 1.0
    cfg_rho: float = 0.7
    eta: Optional[float] = None  # None: the sampler's default (DDPM 1, DDIM 0)

    def replace(self, **changes: Any) -> "SamplingSettings":
        """A copy with the given fields changed; ``None`` values mean "keep".

        Changing the sampler drops an inherited ``eta`` (the official eta 1 belongs to DDPM).
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes.get("sampler", self.sampler) != self.sampler and "eta" not in changes:
            changes["eta"] = None
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for PNG metadata and logs)."""
        return dataclasses.asdict(self)


def from_preset(name: str) -> SamplingSettings:
    """Settings from ``gdf.presets.SAMPLING[name]`` (the single source of the official values)."""
    from gdf.presets import SAMPLING

    preset = SAMPLING[name]
    return SamplingSettings(timesteps=int(preset["timesteps"]), cfg=preset["cfg"],
                            shift=float(preset["shift"]), sampler=preset["sampler"],
                            t_start=float(preset["t_start"]), cfg_rho=float(preset["cfg_rho"]),
                            eta=(preset.get("sampler_params") or {}).get("eta"))


# Official sampling settings (docs/OFFICIAL.md).
STAGE_C_INFERENCE = from_preset("stage_c_inference")
STAGE_B_INFERENCE = from_preset("stage_b_inference")
STAGE_C_PREVIEW = from_preset("stage_c_preview")
STAGE_B_PREVIEW = from_preset("stage_b_preview")
IMG2IMG_STRENGTH = 0.8


def stage_c_shape(batch: int, height: int, width: int, channels: int = 16) -> tuple[int, ...]:
    """Stage C latent shape for an HxW image: (B, 16, ceil(H/42.67), ceil(W/42.67)); 1024 -> 24."""
    return (batch, channels, math.ceil(height / STAGE_C_COMPRESSION),
            math.ceil(width / STAGE_C_COMPRESSION))


def stage_b_shape(batch: int, height: int, width: int, channels: int = 4) -> tuple[int, ...]:
    """Stage B latent shape for an HxW image: (B, 4, ceil(H/4), ceil(W/4)); 1024 -> 256."""
    return (batch, channels, math.ceil(height / STAGE_A_COMPRESSION),
            math.ceil(width / STAGE_A_COMPRESSION))


def make_generator(seed: int) -> torch.Generator:
    """The CPU generator every sampling call draws from (device independent results)."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def make_sampler(gdf: Any, name: str) -> Any:
    """``ddpm``/``ddim``/``lcm`` -> the gdf sampler object bound to ``gdf``."""
    from gdf.samplers import make_sampler as build

    return build(name.lower(), gdf)


def autocast_for(device: Union[str, torch.device], dtype: Optional[torch.dtype]):
    """bf16 autocast on CUDA when the weights are bf16 (the original's regime), else a no-op."""
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for param in model.parameters():
        return param.device, param.dtype
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def run_sampler(model: torch.nn.Module, gdf: Any, conditions: Mapping[str, Any],
                unconditions: Optional[Mapping[str, Any]], shape: Sequence[int],
                settings: SamplingSettings, *, generator: Optional[torch.Generator] = None,
                x_init: Optional[torch.Tensor] = None, device: Union[str, torch.device, None] = None,
                progress: Union[bool, str] = False,
                autocast: Optional[contextlib.AbstractContextManager] = None) -> torch.Tensor:
    """Run ``GDF.sample`` to the end and return the LAST predicted x0 (float32); see
    docs/OFFICIAL.md, The sampling loop.

    ``conditions``/``unconditions`` are paired by position (as in the official loop), so both must
    list the same keys in the same order. ``progress`` shows a tqdm bar (a string is its label).
    ``autocast``: the context the model runs in (a training run passes its own precision); None =
    bf16 autocast on CUDA for bf16 weights (:func:`autocast_for`).
    """
    if list(conditions) != list(unconditions or conditions):
        raise ValueError("conditions and unconditions must have the same keys in the same order")
    model_device, model_dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    params = {} if settings.eta is None else {"eta": settings.eta}
    steps = settings.timesteps
    sampling = gdf.sample(
        generator=generator, model=model, model_inputs=dict(conditions), shape=tuple(shape),
        unconditional_inputs=None if unconditions is None else dict(unconditions),
        sampler=make_sampler(gdf, settings.sampler), t_start=settings.t_start, timesteps=steps,
        x_init=x_init, cfg=settings.cfg, cfg_rho=settings.cfg_rho, sampler_params=params,
        shift=settings.shift, device=device)
    label = progress if isinstance(progress, str) else "sampling"
    sampled = None
    with autocast if autocast is not None else autocast_for(device, model_dtype):
        for x0, _x, _pred in tqdm(sampling, total=steps, desc=label, disable=not progress,
                                  leave=False):
            sampled = x0
    if sampled is None:
        raise ValueError("sampling produced no step (timesteps must be >= 1)")
    return sampled.float()


def sample_stage_c(generator_model: torch.nn.Module, gdf: Any, conditions: Mapping[str, Any],
                   unconditions: Optional[Mapping[str, Any]], shape: Sequence[int],
                   settings: SamplingSettings = STAGE_C_INFERENCE, **kwargs: Any) -> torch.Tensor:
    """Sample a Stage C latent (B,16,h,w).

    ``conditions`` = {clip_text, clip_text_pooled, clip_img[, cnet]}; ``unconditions`` the same
    keys for the empty caption / zero image embeds (a ControlNet list is shared by both halves).
    Keyword arguments go to :func:`run_sampler` (generator, x_init, device, progress).
    """
    return run_sampler(generator_model, gdf, conditions, unconditions, shape, settings, **kwargs)


def stage_b_conditions(clip_pooled: torch.Tensor, clip_pooled_uncond: torch.Tensor,
                       effnet: torch.Tensor) -> tuple[dict, dict]:
    """Stage B (conditions, unconditions): effnet = Stage C sample (uncond zeros), clip pooled."""
    return ({"effnet": effnet, "clip": clip_pooled},
            {"effnet": torch.zeros_like(effnet), "clip": clip_pooled_uncond})


def sample_stage_b(generator_model: torch.nn.Module, gdf: Any, conditions: Mapping[str, Any],
                   unconditions: Optional[Mapping[str, Any]], shape: Sequence[int],
                   settings: SamplingSettings = STAGE_B_INFERENCE, **kwargs: Any) -> torch.Tensor:
    """Sample a Stage B latent (B,4,H/4,W/4) from {effnet, clip} conditions (see
    :func:`stage_b_conditions`). Keyword arguments as :func:`run_sampler`."""
    return run_sampler(generator_model, gdf, conditions, unconditions, shape, settings, **kwargs)


def img2img_init(gdf: Any, latents: torch.Tensor, strength: float = IMG2IMG_STRENGTH,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x_init for image-to-image: ``gdf.diffuse(latents, t=strength)`` with seeded noise."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    t = torch.full((latents.size(0),), float(strength), device=latents.device)
    return gdf.diffuse(latents, epsilon=noise, t=t)[0]


def img2img_settings(settings: SamplingSettings, strength: float = IMG2IMG_STRENGTH) -> SamplingSettings:
    """Start at t = strength with int(steps * strength) steps (the notebooks' 16 of 20)."""
    return settings.replace(t_start=float(strength),
                            timesteps=max(1, int(settings.timesteps * strength)))


@torch.no_grad()
def decode_stage_a(stage_a: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Stage B latent -> image in [0,1] (unquantised decode, float32, clamped)."""
    device, dtype = _model_device_dtype(stage_a)
    return stage_a.decode(latents.to(device, dtype)).float().clamp(0, 1)


@torch.no_grad()
def preview_stage_c(previewer: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Stage C latent -> low-resolution preview image in [0,1] (8x the latent size)."""
    device, dtype = _model_device_dtype(previewer)
    return previewer(latents.to(device, dtype)).float().clamp(0, 1)
