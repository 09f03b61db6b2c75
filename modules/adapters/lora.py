"""The LoRA and DoRA kinds.

LoRA: ``delta = lora_up @ lora_down * alpha / rank``; ``lora_down`` (r, in) starts at zero and
``lora_up`` (out, r) ~ N(0, 1) (the official init), so a fresh LoRA leaves the layer unchanged; on a
conv weight our update is constant over the kernel (docs/OFFICIAL.md, LoRA and ReToken). Files of other tools may
hold a full conv LoRA (``lora_down`` (r, in, kh, kw), ``lora_up`` (out, r, 1, 1)): merged exactly,
but not loadable as our trainable LoRA unless kernel-constant.

DoRA (Liu et al. 2024): ``W' = m * (W + delta) / ||W + delta||_row`` with a trainable magnitude
``dora_magnitude`` (out,) that starts at the base weight's row norms, so a fresh DoRA reproduces
the base bit for bit. The norm is differentiated through (a per-weight cost here).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from modules.adapters.base import Adapter, AdapterError, register, scale_of, view_as
from modules.adapters.dora import comfy_dora_scale, dora_weight, row_norms

_LORA_FILE = {"named": {"lora_down": "lora_down", "lora_up": "lora_up"},
              "official": {"lora_down": "lora_down", "lora_up": "lora_up"},
              "comfy": {"lora_down": "lora_down.weight", "lora_up": "lora_up.weight"},
              "peft": {"lora_down": "lora_A.weight", "lora_up": "lora_B.weight"}}


@register
class LoRA(Adapter):
    """Low-rank update ``W + lora_up @ lora_down * alpha / rank`` (alpha default 1: scale 1/rank)."""

    kind, title = "lora", "LoRA"
    up_names = ("lora_up",)
    file_names = _LORA_FILE
    rank_tensors, required, prefix = ("lora_down",), frozenset({"lora_down", "lora_up"}), "lora_"

    def __init__(self, layer: Any, name: str = "weight", rank: int = 16, alpha: Optional[float] = None,
                 **options: Any):
        super().__init__(layer, name, rank, alpha, **options)
        w = getattr(layer, name) if isinstance(layer, nn.Module) else layer
        self.lora_down = nn.Parameter(torch.zeros(rank, w.size(1), device=w.device, dtype=w.dtype))
        self.lora_up = nn.Parameter(torch.randn(w.size(0), rank, device=w.device, dtype=w.dtype))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return original
        # computed in the adapter's dtype (float32 on a bf16 base), then cast: the base keeps its dtype
        delta = torch.matmul(self.lora_up, self.lora_down) * self.scale
        return original + delta.view(delta.shape + (1,) * (original.dim() - 2)).to(original.dtype)

    @classmethod
    def record_delta(cls, tensors: Mapping[str, torch.Tensor], alpha: Optional[float],
                     shape: Sequence[int]) -> torch.Tensor:
        up, down = tensors["lora_up"].float().flatten(1), tensors["lora_down"].float()
        delta = (up @ down.flatten(1)) * scale_of(alpha, int(down.shape[0]))
        if down.dim() > 2:  # a full conv LoRA: (out, in*kh*kw) back to the kernel it was trained on
            delta = delta.view(up.shape[0], *down.shape[1:])
        return view_as(delta, shape, "LoRA")


    @classmethod
    def record_problem(cls, tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
        up, down = tensors["lora_up"], tensors["lora_down"]
        up_rank = up.shape[1] if up.dim() >= 2 else None
        if up_rank != down.shape[0]:
            return (f"lora_up {tuple(up.shape)} has rank {up_rank} but lora_down {tuple(down.shape)} has rank "
                    f"{down.shape[0]}: the file is inconsistent (damaged or edited); re-export it from its training run")
        return None

    @classmethod
    def param_count(cls, shape: Sequence[int], rank: int, **options: Any) -> int:
        return rank * (int(shape[0]) + int(shape[1]))

    @classmethod
    def split_rows(cls, tensors: Mapping[str, torch.Tensor], parts: int, what: str) -> list:
        up = tensors["lora_up"]
        rows = up.shape[0] // parts
        out = []
        for i in range(parts):
            t = {k: v.clone() for k, v in tensors.items() if k != "lora_up"}
            t["lora_up"] = up[i * rows:(i + 1) * rows].clone()
            if "dora_scale" in tensors:
                t["dora_scale"] = tensors["dora_scale"][i * rows:(i + 1) * rows].clone()
            out.append(t)
        return out

    @classmethod
    def join_rows(cls, records: Sequence, alpha: float, what: str) -> Dict[str, torch.Tensor]:
        first = records[0][0]
        if any("dora_scale" in t for t, _ in records):
            raise AdapterError(f"{what}: a tool's DoRA (dora_scale) is tied to its own normalisation, not to a "
                               f"trainable magnitude; merge it (tools/lora_merge.py) or sample with it")
        for t, _ in records[1:]:
            if t["lora_down"].shape != first["lora_down"].shape or not torch.equal(t["lora_down"], first["lora_down"]):
                raise AdapterError(f"{what}: to_q/to_k/to_v have different lora_down, so they cannot be one packed "
                                   f"rank-{first['lora_down'].shape[0]} LoRA; merge the file into the weights with "
                                   f"tools/lora_merge.py (or sample with it) instead of resuming from it")
        # differing alphas are folded into the up rows
        ups = [t["lora_up"].float() * (a / alpha) for t, a in records]
        return {"lora_down": first["lora_down"], "lora_up": torch.cat(ups).to(first["lora_up"].dtype)}

    @classmethod
    def file_record(cls, tensors: Mapping[str, torch.Tensor], alpha: float, shape: Sequence[int], style: str,
                    dora_form: Optional[str], base: Optional[torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
        out = super().file_record(tensors, alpha, shape, style, dora_form, base, what)
        down, up = out["lora_down"], out["lora_up"]
        if style != "named" and len(shape) > 2 and down.dim() == 2:
            # Our kernel-constant conv LoRA as the full conv LoRA other tools read: lora_down repeated
            # over the kernel and lora_up (out, r, 1, 1) give exactly the same update.
            kernel = tuple(shape[2:])
            out["lora_down"] = down.reshape(*down.shape, *(1,) * len(kernel)).expand(*down.shape, *kernel)
            out["lora_up"] = up.reshape(*up.shape, *(1,) * len(kernel))
        return out

    @classmethod
    def from_file(cls, tensors: Mapping[str, torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
        out = dict(tensors)
        down = out["lora_down"]
        if down.dim() == 4 and tuple(down.shape[-2:]) == (1, 1):
            out["lora_down"] = down.flatten(1)
        out["lora_up"] = out["lora_up"].flatten(1)
        return out

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        down = tensors.get("lora_down")
        if down is not None and down.dim() == 4:
            if not torch.equal(down, down[..., :1, :1].expand_as(down)):
                raise AdapterError(f"{what}: the conv LoRA varies over the kernel; our LoRA is kernel-constant, so it "
                                   f"can only be merged (tools/lora_merge.py)")
            tensors = {**tensors, "lora_down": down[..., 0, 0]}
        super().load_tensors(tensors, what)


@register
class DoRA(LoRA):
    """Weight-decomposed LoRA: ``m * (W + delta) / ||W + delta||_row`` with the LoRA ``delta`` and a
    trainable magnitude ``dora_magnitude`` (out,), float32 whatever the base dtype (a bf16-rounded
    m would not give m / ||W|| == 1 at init)."""

    kind, title = "dora", "DoRA"
    needs_base = True  # ComfyUI's dora_scale divides by the base weight's row norm
    required = frozenset({"lora_down", "lora_up", "dora_magnitude"})
    file_names = {"named": {**_LORA_FILE["named"], "dora_magnitude": "dora_magnitude"},
                  "comfy": _LORA_FILE["comfy"]}

    def __init__(self, layer: Any, name: str = "weight", rank: int = 16, alpha: Optional[float] = None,
                 **options: Any):
        super().__init__(layer, name, rank, alpha, **options)
        w = getattr(layer, name) if isinstance(layer, nn.Module) else layer
        self.magnitude = nn.Parameter(row_norms(w.detach()))

    def tensors(self) -> Dict[str, torch.Tensor]:
        # the parameter keeps its historical name (model state dicts, FSDP optimizer states by name)
        return {"lora_down": self.lora_down, "lora_up": self.lora_up, "dora_magnitude": self.magnitude}

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return original
        delta = torch.matmul(self.lora_up, self.lora_down) * self.scale
        return dora_weight(original, delta, self.magnitude).to(original.dtype)

    @classmethod
    def record_weight(cls, base: torch.Tensor, tensors: Mapping[str, torch.Tensor],
                      alpha: Optional[float]) -> torch.Tensor:
        m = tensors["dora_magnitude"]
        if tuple(m.shape) != tuple(base.shape[:1]):
            raise AdapterError(f"DoRA magnitude has shape {tuple(m.shape)}, the weight {tuple(base.shape)} needs "
                               f"({base.shape[0]},) (a DoRA for another model_version?)")
        delta = LoRA.record_delta(tensors, alpha, tuple(base.shape))
        return dora_weight(base, delta.to(base.device), m.to(base.device))


    @classmethod
    def param_count(cls, shape: Sequence[int], rank: int, **options: Any) -> int:
        return super().param_count(shape, rank) + int(shape[0])

    @classmethod
    def split_rows(cls, tensors: Mapping[str, torch.Tensor], parts: int, what: str) -> list:
        raise AdapterError(f"{what}: our DoRA's magnitude needs its whole weight's rows; export it in a tool's form")

    @classmethod
    def file_record(cls, tensors: Mapping[str, torch.Tensor], alpha: float, shape: Sequence[int], style: str,
                    dora_form: Optional[str], base: Optional[torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
        if style == "named":
            return dict(tensors)
        if dora_form != "comfy":
            why = ("this layout's tool has no DoRA" if dora_form is None else
                   "OneTrainer normalises per INPUT column (dora_scale (1, in)) while our DoRA keeps one magnitude "
                   "per OUTPUT row, so it has no OneTrainer form")
            raise AdapterError(f"{what}: is a DoRA and {why}; export it to ComfyUI, merge it (tools/lora_merge.py), "
                               f"or drop it (--drop)")
        if base is None:
            raise AdapterError(f"{what}: is a DoRA; its ComfyUI dora_scale needs the base weight it was trained on "
                               f"(pass the base Stage C checkpoint)")
        delta = LoRA.record_delta(tensors, alpha, tuple(base.shape))
        if tuple(tensors["dora_magnitude"].shape) != tuple(base.shape[:1]):
            raise AdapterError(f"{what}: DoRA magnitude has shape {tuple(tensors['dora_magnitude'].shape)}, the base "
                               f"weight {tuple(base.shape)} needs ({base.shape[0]},)")
        plain = {"lora_down": tensors["lora_down"], "lora_up": tensors["lora_up"],
                 "dora_scale": comfy_dora_scale(tensors["dora_magnitude"], base, delta)}
        return LoRA.file_record(plain, alpha, shape, style, dora_form, base, what)
