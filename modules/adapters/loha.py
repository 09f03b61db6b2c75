"""The LoHa kind (LyCORIS): a Hadamard product of two low-rank matrices.

``delta = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r`` reshaped to the weight,
``hada_w*_a`` (out, r), ``hada_w*_b`` (r, in*k) (r = ``hada_w1_b``'s rows, as ComfyUI scales), or
for a conv with Tucker cores ``hada_t1``/``hada_t2`` (r, r, kh, kw) and then ``hada_w*_a`` (r, out),
``hada_w*_b`` (r, in) (LyCORIS' layout). Key names are ComfyUI's.

Ours starts with ``hada_w2_a`` at zero (so a fresh LoHa changes nothing) and the others random.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from modules.adapters.base import Adapter, AdapterError, register, scale_of, view_as

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@register
class LoHa(Adapter):
    """LoHa adapter (no extra options)."""

    kind, title = "loha", "LoHa"
    up_names = ("hada_w1_a", "hada_w2_a")
    rank_tensors, prefix = ("hada_w1_b",), "hada_"
    file_names = {style: {n: n for n in _NAMES} for style in ("named", "comfy")}

    def __init__(self, layer: Any, name: str = "weight", rank: int = 16, alpha: Optional[float] = None,
                 **options: Any):
        super().__init__(layer, name, rank, alpha, **options)
        w = getattr(layer, name) if isinstance(layer, nn.Module) else layer
        out, cols = w.shape[0], int(w[0].numel())
        kw = dict(device=w.device, dtype=w.dtype)
        self.hada_w1_a = nn.Parameter(torch.empty(out, rank, **kw))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, cols, **kw))
        self.hada_w2_a = nn.Parameter(torch.zeros(out, rank, **kw))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, cols, **kw))
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_b):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    @staticmethod
    def _product(tensors: Mapping[str, torch.Tensor], i: int) -> torch.Tensor:
        wa, wb = tensors[f"hada_w{i}_a"].float(), tensors[f"hada_w{i}_b"].float()
        t = tensors.get(f"hada_t{i}")
        if t is not None:
            return torch.einsum("ijkl,jr,ip->prkl", t.float(), wb, wa)
        return wa @ wb

    @classmethod
    def record_delta(cls, tensors: Mapping[str, torch.Tensor], alpha: Optional[float],
                     shape: Sequence[int]) -> torch.Tensor:
        missing = [n for n in _NAMES[:4] if n not in tensors]
        if missing:
            raise AdapterError(f"LoHa lacks {', '.join(missing)}")
        delta = cls._product(tensors, 1) * cls._product(tensors, 2) * scale_of(alpha, cls.record_rank(tensors))
        return view_as(delta, shape, "LoHa")


    @classmethod
    def param_count(cls, shape: Sequence[int], rank: int, **options: Any) -> int:
        cols = int(torch.Size(shape[1:]).numel())
        return 2 * rank * (int(shape[0]) + cols)

    @classmethod
    def split_rows(cls, tensors: Mapping[str, torch.Tensor], parts: int, what: str) -> list:
        if "hada_t1" in tensors:
            raise AdapterError(f"{what}: a Tucker LoHa cannot be split into to_q/to_k/to_v")
        rows = tensors["hada_w1_a"].shape[0] // parts
        return [{**{k: v.clone() for k, v in tensors.items()},
                 "hada_w1_a": tensors["hada_w1_a"][i * rows:(i + 1) * rows].clone(),
                 "hada_w2_a": tensors["hada_w2_a"][i * rows:(i + 1) * rows].clone()} for i in range(parts)]

    @classmethod
    def join_rows(cls, records: Sequence, alpha: float, what: str) -> Dict[str, torch.Tensor]:
        first, _ = records[0]
        for t, _a in records[1:]:
            if not all(torch.equal(t[n], first[n]) for n in ("hada_w1_b", "hada_w2_b")):
                raise AdapterError(f"{what}: the to_q/to_k/to_v LoHas do not share hada_w1_b/hada_w2_b, so they are "
                                   f"not one LoHa of the packed projection; merge the file instead of resuming from it")
        # fold each block's alpha into its w1_a rows (the product is linear in w1_a)
        w1 = torch.cat([t["hada_w1_a"].float() * (a / alpha) for t, a in records]).to(first["hada_w1_a"].dtype)
        return {"hada_w1_a": w1, "hada_w1_b": first["hada_w1_b"],
                "hada_w2_a": torch.cat([t["hada_w2_a"] for t, _ in records]), "hada_w2_b": first["hada_w2_b"]}
