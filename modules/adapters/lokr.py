"""The LoKr kind (LyCORIS): a Kronecker product of two factors.

``delta = kron(w1, w2) * scale`` reshaped to the weight, with ``w1`` (a, b) and ``w2`` (c, d*k) for a
weight (out = a*c, in = b*d, kernel k). Either factor may itself be low rank (``lokr_w1_a @
lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``, or with a Tucker core ``lokr_t2`` for a conv). The scale is
``alpha / r`` with r the rank of the low-rank factor (w2's when both are), and 1 when both factors
are full (then alpha is ignored) -- the rule ComfyUI and LyCORIS load with. Key names are ComfyUI's.

Ours trains a full ``w1`` (zero at start, so a fresh LoKr changes nothing) and ``w2`` as
``lokr_w2_a`` (c, r) @ ``lokr_w2_b`` (r, d*k) when ``rank < max(c, d*k) / 2``, else full; the
sizes come from :func:`factorization` of out and in with the ``factor`` option (LyCORIS' ``factor``:
-1 = as square as possible).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from modules.adapters.base import Adapter, AdapterError, register, view_as

_NAMES = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``: ``m = factor`` when it divides, else
    the largest divisor ``m <= sqrt(dimension)`` that is at most ``factor`` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    bound = dimension if factor <= 0 else factor
    best = 1
    for m in range(1, int(math.isqrt(dimension)) + 1):
        if dimension % m == 0 and m <= bound:
            best = m
    return best, dimension // best


def _shapes(shape: Sequence[int], rank: int, factor: int,
            row_blocks: int = 1) -> Tuple[Tuple[int, int], Tuple[int, int], bool]:
    out, inp = int(shape[0]), int(shape[1])
    k = int(torch.Size(shape[2:]).numel())
    # a packed q/k/v weight (row_blocks 3) keeps whole w1 rows per block, so it splits into 3 LoKrs
    a, c = factorization(out // row_blocks, factor)
    a *= row_blocks
    b, d = factorization(inp, factor)
    low_rank = rank < max(c, d * k) / 2
    return (a, b), (c, d * k), low_rank


@register
class LoKr(Adapter):
    """LoKr adapter; options: ``factor`` (int, -1 default), ``row_blocks`` (3 on a packed q/k/v weight)."""

    kind, title = "lokr", "LoKr"
    up_names = ("lokr_w1", "lokr_w2_a")
    config_options = {"factor": "lokr_factor"}
    rank_tensors, prefix = ("lokr_w2_b", "lokr_w1_b"), "lokr_"
    file_names = {style: {n: n for n in _NAMES} for style in ("named", "comfy")}

    def __init__(self, layer: Any, name: str = "weight", rank: int = 16, alpha: Optional[float] = None,
                 factor: int = -1, row_blocks: int = 1, **options: Any):
        super().__init__(layer, name, rank, alpha, **options)
        w = getattr(layer, name) if isinstance(layer, nn.Module) else layer
        (a, b), (c, dk), low_rank = _shapes(w.shape, rank, factor, row_blocks)
        kw = dict(device=w.device, dtype=w.dtype)
        self.lokr_w1 = nn.Parameter(torch.zeros(a, b, **kw))
        if low_rank:
            self.lokr_w2_a = nn.Parameter(torch.empty(c, rank, **kw))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, dk, **kw))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(c, dk, **kw))
            nn.init.kaiming_uniform_(self.lokr_w2, a=math.sqrt(5))

    @staticmethod
    def _factor(tensors: Mapping[str, torch.Tensor], i: int) -> Tuple[torch.Tensor, Optional[int]]:
        full = tensors.get(f"lokr_w{i}")
        if full is not None:
            return full.float(), None
        wa, wb = tensors.get(f"lokr_w{i}_a"), tensors.get(f"lokr_w{i}_b")
        if wa is None or wb is None:
            raise AdapterError(f"LoKr needs lokr_w{i} or lokr_w{i}_a and lokr_w{i}_b")
        t = tensors.get(f"lokr_t{i}")
        if t is not None:  # Tucker: core (r, r, kh, kw), wa (r, c), wb (r, d)
            return torch.einsum("ijkl,jr,ip->prkl", t.float(), wb.float(), wa.float()), int(wb.shape[0])
        return wa.float() @ wb.float(), int(wb.shape[0])

    @classmethod
    def record_delta(cls, tensors: Mapping[str, torch.Tensor], alpha: Optional[float],
                     shape: Sequence[int]) -> torch.Tensor:
        w1, r1 = cls._factor(tensors, 1)
        w2, r2 = cls._factor(tensors, 2)
        rank = r2 if r2 is not None else r1
        scale = 1.0 if rank is None or alpha is None else float(alpha) / rank
        if w2.dim() == 4:
            w1 = w1.view(*w1.shape, 1, 1)
        return view_as(torch.kron(w1.contiguous(), w2.contiguous()) * scale, shape, "LoKr")


    @classmethod
    def param_count(cls, shape: Sequence[int], rank: int, factor: int = -1, row_blocks: int = 1,
                    **options: Any) -> int:
        (a, b), (c, dk), low_rank = _shapes(shape, rank, factor, row_blocks)
        return a * b + (rank * (c + dk) if low_rank else c * dk)

    @classmethod
    def split_rows(cls, tensors: Mapping[str, torch.Tensor], parts: int, what: str) -> list:
        # kron rows are (row of w1) x (row of w2): a split at a w1 row boundary keeps w2 whole
        w1 = tensors.get("lokr_w1")
        if w1 is None or w1.shape[0] % parts:
            raise AdapterError(f"{what}: this LoKr's w1 has {None if w1 is None else w1.shape[0]} rows, not a "
                               f"multiple of {parts} full rows, so it cannot be written as separate to_q/to_k/to_v "
                               f"LoKrs; keep the named layout or merge it")
        rows = w1.shape[0] // parts
        return [{**{k: v.clone() for k, v in tensors.items()}, "lokr_w1": w1[i * rows:(i + 1) * rows].clone()}
                for i in range(parts)]

    @classmethod
    def join_rows(cls, records: Sequence, alpha: float, what: str) -> Dict[str, torch.Tensor]:
        first, a0 = records[0]
        for t, a in records[1:]:
            same = set(t) == set(first) and all(k == "lokr_w1" or torch.equal(t[k], first[k]) for k in t)
            if not same or a != a0:
                raise AdapterError(f"{what}: the to_q/to_k/to_v LoKrs do not share w2, so they are not one LoKr of "
                                   f"the packed projection; merge the file instead of resuming from it")
        joined = dict(first)
        joined["lokr_w1"] = torch.cat([t["lokr_w1"] for t, _ in records])
        if a0 != alpha and "lokr_w2_b" in first:  # alpha only scales a LoKr with a low-rank factor
            joined["lokr_w1"] = (joined["lokr_w1"].float() * (a0 / alpha)).to(first["lokr_w1"].dtype)
        return joined
