"""The sampling loop behind ``GDF.sample`` (argument checks first, then a Python generator)."""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any, Iterator, Mapping

import torch

from . import _rng
from ._checks import int_at_least, positive
from .cfg_inputs import merge_cfg_inputs, zeros_like_inputs
from .samplers import DDPMSampler, make_sampler

__all__ = ["SamplingState", "prepare_sampling", "sampling_loop"]

_SENDABLE = ("cfg", "cfg_rho", "sampler", "model_inputs", "x", "x_init")


@dataclass
class SamplingState:
    """Everything the loop needs, validated and placed on the sampling device."""

    model: Any
    model_inputs: Mapping[str, Any]
    unconditional_inputs: Mapping[str, Any] | None
    sampler: Any
    r_range: torch.Tensor
    logSNR_range: torch.Tensor
    x: torch.Tensor
    x_init: torch.Tensor | None
    cfg: Any
    cfg_t_stop: float | None
    cfg_t_start: float | None
    cfg_rho: float
    step_kwargs: dict[str, Any]
    merged_inputs: dict[str, Any] | None = None


def _check_cfg(cfg: Any) -> Any:
    if cfg is None or (isinstance(cfg, Real) and not isinstance(cfg, bool)):
        return cfg
    if isinstance(cfg, (list, tuple)) and len(cfg) == 2 and all(isinstance(c, Real) for c in cfg):
        return cfg
    raise ValueError(f"cfg must be None, a number or a [start, end] pair of numbers, got {cfg!r}")


def _check_cfg_rho(cfg_rho: Any) -> float:
    if isinstance(cfg_rho, bool) or not isinstance(cfg_rho, Real) or cfg_rho < 0:
        raise ValueError(f"cfg_rho must be a number >= 0, got {cfg_rho!r}")
    return cfg_rho


def _resolve_sampler(sampler: Any, gdf) -> Any:
    if isinstance(sampler, str):
        return make_sampler(sampler, gdf)
    if not callable(sampler):
        raise ValueError(f"sampler must be a sampler object or a name, got {type(sampler).__name__}")
    return sampler


def _optional_number(name: str, value: Any) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
        raise ValueError(f"{name} must be None or a number, got {value!r}")
    return value


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def prepare_sampling(gdf, *, model, model_inputs, shape, unconditional_inputs, sampler, schedule, t_start,
                     t_end, timesteps, x_init, cfg, cfg_t_stop, cfg_t_start, cfg_rho, sampler_params, shift,
                     device, generator) -> SamplingState:
    """Validate the arguments of ``GDF.sample`` and compute the λ grid and the initial x."""
    if not callable(model):
        raise ValueError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(model_inputs, Mapping):
        raise ValueError(f"model_inputs must be a dict, got {type(model_inputs).__name__}")
    if unconditional_inputs is not None and not isinstance(unconditional_inputs, Mapping):
        raise ValueError(f"unconditional_inputs must be a dict or None, got {type(unconditional_inputs).__name__}")
    int_at_least("timesteps", timesteps, 1)
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"{name} must be a number, got {value!r}")
    cfg = _check_cfg(cfg)
    cfg_rho = _check_cfg_rho(cfg_rho)
    cfg_t_stop = _optional_number("cfg_t_stop", cfg_t_stop)
    cfg_t_start = _optional_number("cfg_t_start", cfg_t_start)
    positive("shift", shift)
    _rng.check_generator(generator)
    if sampler_params is not None and not isinstance(sampler_params, Mapping):
        raise ValueError(f"sampler_params must be a dict or None, got {type(sampler_params).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device, got {device!r}") from None

    sampler = DDPMSampler(gdf) if sampler is None else _resolve_sampler(sampler, gdf)
    schedule = gdf.schedule if schedule is None else schedule
    if x_init is None:
        if shape is None or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise ValueError(f"shape must be a sequence of positive ints, got {shape!r}")
        batch = shape[0]
    else:
        if not isinstance(x_init, torch.Tensor):
            raise ValueError(f"x_init must be a tensor or None, got {type(x_init).__name__}")
        if shape is not None and tuple(shape) != tuple(x_init.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x_init's shape {tuple(x_init.shape)}")
        if not _same_device(x_init.device, device):
            raise ValueError(f"x_init is on {x_init.device} but device is {device}; move it or pass device")
        batch = x_init.size(0)

    r_range = torch.linspace(t_start, t_end, timesteps + 1)
    logSNR_range = schedule(r_range, shift=shift)[:, None].expand(-1, batch).to(device)
    if x_init is None:
        # only pass the generator when given, so custom samplers with init_x(shape) keep working
        x = (sampler.init_x(shape) if generator is None else sampler.init_x(shape, generator=generator)).to(device)
    else:
        x = x_init.clone()
    step_kwargs = dict(sampler_params or {})
    if generator is not None:
        step_kwargs["generator"] = generator
    state = SamplingState(model, model_inputs, unconditional_inputs, sampler, r_range, logSNR_range, x, x_init,
                          cfg, cfg_t_stop, cfg_t_start, cfg_rho, step_kwargs)
    if cfg is not None:
        state.merged_inputs = _merge(state)  # early, so bad inputs fail before the first step
    return state


def _merge(state: SamplingState) -> dict[str, Any]:
    uncond = state.unconditional_inputs
    return merge_cfg_inputs(state.model_inputs, zeros_like_inputs(state.model_inputs) if uncond is None else uncond)


def _guided_prediction(state: SamplingState, x: torch.Tensor, noise_cond: torch.Tensor,
                       merged_inputs: Mapping[str, Any], r: float) -> torch.Tensor:
    cfg = state.cfg
    weight = cfg[0] * r + cfg[1] * (1 - r) if isinstance(cfg, (list, tuple)) else cfg
    pred, pred_uncond = state.model(torch.cat([x, x], dim=0), noise_cond.repeat(2), **merged_inputs).chunk(2)
    pred_cfg = torch.lerp(pred_uncond, pred, weight)
    if state.cfg_rho > 0:
        # rescale towards the conditional prediction's std (whole tensor, unbiased), as the reference
        std_pos, std_cfg = pred.std(), pred_cfg.std()
        return state.cfg_rho * (pred_cfg * std_pos / (std_cfg + 1e-9)) + pred_cfg * (1 - state.cfg_rho)
    return pred_cfg


def _apply_sent(state: SamplingState, altered: Any, gdf) -> bool:
    """Apply values sent into the generator; returns True if the model inputs changed."""
    if not isinstance(altered, Mapping):
        raise ValueError(f"values sent into sample() must be a dict, got {type(altered).__name__}")
    unknown = [k for k in altered if k not in _SENDABLE]
    if unknown:
        raise ValueError(f"cannot change {unknown} while sampling; allowed keys: {list(_SENDABLE)}")
    if "cfg" in altered:
        state.cfg = _check_cfg(altered["cfg"])
    if "cfg_rho" in altered:
        state.cfg_rho = _check_cfg_rho(altered["cfg_rho"])
    if "sampler" in altered:
        state.sampler = _resolve_sampler(altered["sampler"], gdf)
    if "x" in altered:
        state.x = altered["x"]
    if "x_init" in altered:
        state.x_init = altered["x_init"]  # kept for parity with the reference; unused after start
    if "model_inputs" in altered:
        if not isinstance(altered["model_inputs"], Mapping):
            raise ValueError("model_inputs must be a dict")
        state.model_inputs = altered["model_inputs"]
        return True
    return False


@torch.no_grad()
def sampling_loop(gdf, state: SamplingState) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the denoising steps, yielding ``(x0, x, pred)`` after each (see ``GDF.sample``)."""
    timesteps = state.r_range.numel() - 1
    for i in range(timesteps):
        r = state.r_range[i].item()
        logSNR, logSNR_next = state.logSNR_range[i], state.logSNR_range[i + 1]
        noise_cond = gdf.noise_cond(logSNR)
        use_cfg = (state.cfg is not None
                   and (state.cfg_t_stop is None or r >= state.cfg_t_stop)
                   and (state.cfg_t_start is None or r <= state.cfg_t_start))
        if use_cfg:
            if state.merged_inputs is None:
                state.merged_inputs = _merge(state)
            pred = _guided_prediction(state, state.x, noise_cond, state.merged_inputs, r)
        else:
            # un-guided steps use the conditional inputs alone (the reference kept the doubled batch)
            pred = state.model(state.x, noise_cond, **state.model_inputs)
        x0, epsilon = gdf.undiffuse(state.x, logSNR, pred)
        state.x = state.sampler(state.x, x0, epsilon, logSNR, logSNR_next, **state.step_kwargs)
        altered = yield (x0, state.x, pred)
        if altered is not None and _apply_sent(state, altered, gdf):
            state.merged_inputs = None
