"""Random draws that honour an optional ``torch.Generator``.

With ``generator=None`` every helper makes exactly the call the reference code makes (global RNG,
same function, same device), so seeded runs reproduce official samples. With a generator, the same
draw is made from it, on the generator's device, and then moved where the result is needed.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["check_generator", "rand", "randn", "randn_like", "multinomial"]


def check_generator(generator: torch.Generator | None, name: str = "generator") -> None:
    """Raise ``ValueError`` naming the argument if ``generator`` is neither None nor a Generator."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")


def rand(size: int | Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.rand(size)`` (float32, CPU for the global RNG, the generator's device otherwise)."""
    if generator is None:
        return torch.rand(size)
    return torch.rand(size, generator=generator, device=generator.device)


def randn(
    size: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``torch.randn(size, device=device, dtype=dtype)``, drawn from ``generator`` when given.

    With a generator the draw happens on the generator's device and the result is moved to
    ``device`` (when given), because a generator can only feed tensors on its own device.
    """
    size = tuple(int(s) for s in size)
    if generator is None:
        return torch.randn(size, device=device, dtype=dtype)
    out = torch.randn(size, generator=generator, device=generator.device, dtype=dtype)
    return out if device is None else out.to(device)


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.randn_like(x)``, or the same draw from ``generator`` moved to ``x``'s device."""
    if generator is None:
        return torch.randn_like(x)
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def multinomial(
    probs: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``torch.multinomial(probs, num_samples, replacement=True)`` on the generator's device."""
    if generator is None:
        return torch.multinomial(probs, num_samples, replacement=True)
    return torch.multinomial(
        probs.to(generator.device), num_samples, replacement=True, generator=generator
    )
