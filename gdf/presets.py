"""The official Stable Cascade configurations: training GDFs and sampling settings (docs/OFFICIAL.md,
GDF and sampling)."""
from __future__ import annotations

import copy
from typing import Any

from .adaptive_loss import AdaptiveLossWeight
from .framework import GDF
from .loss_weights import P2LossWeight
from .noise_conds import CosineTNoiseCond
from .samplers import make_sampler
from .scalers import VPScaler
from .schedules import CosineSchedule
from .targets import EpsilonTarget

__all__ = ["stage_c", "stage_b", "controlnet", "SAMPLING", "make_sampler", "sampling_kwargs"]


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_offset(offset_noise: Any) -> float:
    if isinstance(offset_noise, bool) or not isinstance(offset_noise, (int, float)) or offset_noise < 0:
        raise ValueError(f"offset_noise must be a number >= 0, got {offset_noise!r}")
    return float(offset_noise)


def _build(loss_weight, offset_noise: float) -> GDF:
    return GDF(
        schedule=CosineSchedule(clamp_range=[0.0001, 0.9999]),
        input_scaler=VPScaler(),
        target=EpsilonTarget(),
        noise_cond=CosineTNoiseCond(),
        loss_weight=loss_weight,
        offset_noise=offset_noise,
    )


def stage_c(adaptive_loss_weight: bool = False, offset_noise: float = 0.0) -> GDF:
    """Stage C (and LoRA) training GDF: cosine schedule, VP, ε-target, CosineT noise cond.

    Loss weight: AdaptiveLossWeight if ``adaptive_loss_weight`` else P2LossWeight.
    """
    adaptive = _check_bool("adaptive_loss_weight", adaptive_loss_weight)
    return _build(AdaptiveLossWeight() if adaptive else P2LossWeight(), _check_offset(offset_noise))


def stage_b(adaptive_loss_weight: bool = False) -> GDF:
    """Stage B training GDF (same objects as Stage C, no offset noise; ε is pyramid noise)."""
    adaptive = _check_bool("adaptive_loss_weight", adaptive_loss_weight)
    return _build(AdaptiveLossWeight() if adaptive else P2LossWeight(), 0.0)


def controlnet(offset_noise: float = 0.0) -> GDF:
    """ControlNet training GDF: always P2LossWeight; offset noise 0.1 for inpainting and SR."""
    return _build(P2LossWeight(), _check_offset(offset_noise))


#: Official sampling settings (docs/OFFICIAL.md, Official sampling settings): keyword arguments of ``GDF.sample`` plus
#: ``"sampler"`` as a name (resolve it with ``make_sampler`` or use ``sampling_kwargs``).
#: For "stage_c_img2img" the caller also passes ``x_init = gdf.diffuse(latents, t=ones·t_start)[0]``.
SAMPLING: dict[str, dict[str, Any]] = {
    "stage_c_preview": {"sampler": "ddpm", "cfg": 5, "shift": 1, "timesteps": 20, "t_start": 1.0,
                        "t_end": 0.0, "cfg_rho": 0.7},
    "stage_b_preview": {"sampler": "ddpm", "cfg": 1.5, "shift": 1, "timesteps": 10, "t_start": 1.0,
                        "t_end": 0.0, "cfg_rho": 0.7},
    "stage_c_inference": {"sampler": "ddpm", "cfg": 4, "shift": 2, "timesteps": 20, "t_start": 1.0,
                          "t_end": 0.0, "cfg_rho": 0.7, "sampler_params": {"eta": 1}},
    "stage_b_inference": {"sampler": "ddpm", "cfg": 1.1, "shift": 1, "timesteps": 10, "t_start": 1.0,
                          "t_end": 0.0, "cfg_rho": 0.7, "sampler_params": {"eta": 1}},
    "stage_c_img2img": {"sampler": "ddpm", "cfg": 4, "shift": 2, "timesteps": int(20 * 0.8), "t_start": 0.8,
                        "t_end": 0.0, "cfg_rho": 0.7, "sampler_params": {"eta": 1}},
}


def sampling_kwargs(name: str, gdf: GDF) -> dict[str, Any]:
    """A fresh copy of ``SAMPLING[name]`` with the sampler name replaced by a sampler object."""
    if name not in SAMPLING:
        raise ValueError(f"name: unknown sampling config {name!r}, expected one of {sorted(SAMPLING)}")
    kwargs = copy.deepcopy(SAMPLING[name])
    kwargs["sampler"] = make_sampler(kwargs["sampler"], gdf)
    return kwargs
