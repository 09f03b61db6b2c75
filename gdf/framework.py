"""The GDF object: diffuse (training), undiffuse, and ``sample`` (inference)."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from . import _rng
from ._checks import positive, tensor_arg
from .sampling import prepare_sampling, sampling_loop

__all__ = ["GDF"]

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # (B,) coefficients broadcast over the remaining dimensions of `like`
    return v.view(-1, *[1] * (like.dim() - 1)) if v.dim() == 1 else v


class GDF:
    """Generalized Diffusion Framework: everything is expressed through logSNR λ.

    Args:
        schedule: t → λ (e.g. ``CosineSchedule``).
        input_scaler: λ → (a, b), noised = a·x0 + b·ε (e.g. ``VPScaler``).
        target: what the network predicts (e.g. ``EpsilonTarget``).
        noise_cond: λ → the scalar fed to the network (e.g. ``CosineTNoiseCond``).
        loss_weight: λ → per-sample loss weight (e.g. ``P2LossWeight``, ``AdaptiveLossWeight``).
        offset_noise: strength of the per-channel offset noise added to ε in ``diffuse``.
    """

    def __init__(self, schedule, input_scaler, target, noise_cond, loss_weight, offset_noise: float = 0):
        for name, value in (("schedule", schedule), ("input_scaler", input_scaler), ("target", target),
                            ("noise_cond", noise_cond), ("loss_weight", loss_weight)):
            if not callable(value):
                raise ValueError(f"{name} must be a callable gdf component, got {type(value).__name__}")
        if isinstance(offset_noise, bool) or not isinstance(offset_noise, (int, float)) or offset_noise < 0:
            raise ValueError(f"offset_noise must be a number >= 0, got {offset_noise!r}")
        self.schedule = schedule
        self.input_scaler = input_scaler
        self.target = target
        self.noise_cond = noise_cond
        self.loss_weight = loss_weight
        self.offset_noise = offset_noise

    def setup_limits(self, stretch_max: bool = True, stretch_min: bool = True, shift: float = 1) -> list[float]:
        """Stretch the input scaler to the schedule's range (not used by Stable Cascade)."""
        return self.input_scaler.setup_limits(self.schedule, self.input_scaler, stretch_max, stretch_min, shift)

    def diffuse(self, x0: torch.Tensor, epsilon: torch.Tensor | None = None, t: torch.Tensor | None = None,
                shift: float = 1, loss_shift: float = 1, offset: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Noise ``x0`` at random (or given) times.

        Returns ``(noised, epsilon, target, logSNR, noise_cond, loss_weight)``; ``epsilon``
        includes the offset noise. RNG order (global RNG, or ``generator``): ε = randn_like(x0)
        [if not given] → offset randn(B, C, 1, …) drawn on CPU then moved [if offset_noise > 0 and
        no ``offset``] → the schedule's random t [if ``t`` is None]. ``logSNR`` is float32 (B,).
        """
        tensor_arg("x0", x0)
        if x0.dim() < 1 or x0.size(0) < 1:
            raise ValueError(f"x0 must have a non-empty batch dimension, got shape {tuple(x0.shape)}")
        _rng.check_generator(generator)
        positive("shift", shift)
        positive("loss_shift", loss_shift)
        batch = x0.size(0)
        if epsilon is not None and (not isinstance(epsilon, torch.Tensor) or epsilon.shape != x0.shape):
            got = tuple(epsilon.shape) if isinstance(epsilon, torch.Tensor) else type(epsilon).__name__
            raise ValueError(f"epsilon must be a tensor of x0's shape {tuple(x0.shape)}, got {got}")
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch,)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be None or a tensor of shape ({batch},), got {got}")
        if offset is not None and self.offset_noise == 0:
            raise ValueError("offset was given but this GDF has offset_noise = 0, so it would be ignored")

        if epsilon is None:
            epsilon = _rng.randn_like(x0, generator)
        if self.offset_noise > 0:
            if offset is None:
                if x0.dim() < 2:
                    raise ValueError(f"x0 must be at least (B, C) for offset noise, got {tuple(x0.shape)}")
                offset = _rng.randn([batch, x0.size(1)] + [1] * (x0.dim() - 2), generator).to(x0.device)
            elif not isinstance(offset, torch.Tensor) or _broadcast(offset.shape, x0.shape) != x0.shape:
                raise ValueError(f"offset must be a tensor broadcastable to x0's shape {tuple(x0.shape)}")
            epsilon = epsilon + offset * self.offset_noise
        logSNR = self.schedule(batch if t is None else t, shift=shift, generator=generator).to(x0.device)
        a, b = self.input_scaler(logSNR)
        a, b = _per_sample(a, x0), _per_sample(b, x0)
        target = self.target(x0, epsilon, logSNR, a, b)
        return (x0 * a + epsilon * b, epsilon, target, logSNR, self.noise_cond(logSNR),
                self.loss_weight(logSNR, shift=loss_shift))

    def undiffuse(self, x: torch.Tensor, logSNR: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, ε) implied by the network prediction ``pred`` for the noised ``x`` at ``logSNR``."""
        a, b = self.input_scaler(logSNR)
        a, b = _per_sample(a, x), _per_sample(b, x)
        return self.target.x0(x, pred, logSNR, a, b), self.target.epsilon(x, pred, logSNR, a, b)

    def sample(self, model: Callable[..., torch.Tensor], model_inputs: Mapping[str, Any],
               shape: Sequence[int] | None, unconditional_inputs: Mapping[str, Any] | None = None,
               sampler=None, schedule=None, t_start: float = 1.0, t_end: float = 0.0, timesteps: int = 20,
               x_init: torch.Tensor | None = None, cfg: float | Sequence[float] | None = 3.0,
               cfg_t_stop: float | None = None, cfg_t_start: float | None = None, cfg_rho: float = 0.7,
               sampler_params: Mapping[str, Any] | None = None, shift: float = 1,
               device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> Iterator[Sample]:
        """Denoise from ``t_start`` to ``t_end`` in ``timesteps`` steps; yields ``(x0, x, pred)``.

        The sample is the LAST yielded x0 (``*_, (sampled, _, _) = gdf.sample(...)``). Arguments
        are validated here, before the first step. ``sampler`` is a sampler object or a name
        ("ddpm", "ddim", "lcm"); None means DDPM. With ``cfg`` set, the model is called once on
        the doubled batch [conditional; unconditional] (inputs paired by key; missing
        ``unconditional_inputs`` become zeros) and guided with lerp(uncond, cond, cfg), rescaled
        by ``cfg_rho``. Steps outside [``cfg_t_stop``, ``cfg_t_start``] call the model on the
        conditional inputs only. RNG: one randn(shape) for x [if no ``x_init``], then one
        randn_like per step. ``send({...})`` may replace ``cfg``, ``cfg_rho``, ``sampler``,
        ``model_inputs`` (the conditional inputs), ``x`` or ``x_init``. See gdf/README.md.
        """
        state = prepare_sampling(
            self, model=model, model_inputs=model_inputs, shape=shape,
            unconditional_inputs=unconditional_inputs, sampler=sampler, schedule=schedule,
            t_start=t_start, t_end=t_end, timesteps=timesteps, x_init=x_init, cfg=cfg,
            cfg_t_stop=cfg_t_stop, cfg_t_start=cfg_t_start, cfg_rho=cfg_rho,
            sampler_params=sampler_params, shift=shift, device=device, generator=generator,
        )
        return sampling_loop(self, state)

    def __repr__(self) -> str:
        return (f"GDF(schedule={type(self.schedule).__name__}, input_scaler={type(self.input_scaler).__name__}, "
                f"target={type(self.target).__name__}, noise_cond={type(self.noise_cond).__name__}, "
                f"loss_weight={type(self.loss_weight).__name__}, offset_noise={self.offset_noise})")


def _broadcast(a: torch.Size, b: torch.Size) -> torch.Size | None:
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        return None
