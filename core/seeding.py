"""Seeds and generators: the one place where run randomness is derived.

Every draw of a training step comes from a generator seeded by a tuple such as
``(seed, "sample", update, micro_step, global_sample_index)``, so a run repeats exactly on resume
and gives the same per-sample draws whatever the number of processes.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["derive_seed", "seeded_generator", "per_sample_generators"]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded_generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def per_sample_generators(seed: int, step: int, micro: int, first_index: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample, keyed by its GLOBAL index ``first_index + i`` in the
    (update ``step``, ``micro``-step) batch: draws do not depend on how samples split over ranks."""
    return [seeded_generator(seed, "sample", step, micro, first_index + i) for i in range(n)]
