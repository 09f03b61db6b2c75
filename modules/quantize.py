"""Weight-only quantisation of a frozen network (``base_dtype: int8 | float8_e4m3fn``).

Why: a frozen base (the Stage C under a LoRA / DoRA / ControlNet, the CLIP text encoder) is most of a
low-VRAM run's memory; stored in 8 bits it takes half of bf16. Compute stays in the network's dtype
(bf16 on a GPU): each weight is dequantised when an op reads it and the copy dies with the op.

How: :func:`quantize_frozen_` swaps, from outside the model files, the weights of the big layers
(``nn.Linear``, dense ``nn.Conv2d``, ``nn.MultiheadAttention.in_proj_weight``) for
:class:`QuantizedWeight` parameters. The modules keep their class, attribute names and forward, so
everything that reads ``layer.weight`` keeps working: a LoRA/DoRA parametrization registered
afterwards receives the dequantised weight as its ``original`` (adapters attach AFTER quantising),
``mha_sdpa`` slices ``in_proj_weight`` (a row slice stays quantised). Norms, embeddings, biases,
depthwise convs and layers under ``min_numel`` weights stay as they are.

Storage: per output row, blocks of ``block_size`` consecutive weights of the flattened row (0 = the
whole row) share one float32 scale ``absmax / qmax`` (int8: symmetric, qmax 127, round to nearest;
float8_e4m3fn: qmax 448, the cast rounds). A row is zero-padded to whole blocks.

Memory in backward: autograd saves the :class:`QuantizedWeight` itself (8-bit codes) where a matmul
or convolution needs the weight for the input gradient, and dequantises again in backward, so no
full-precision copy of a frozen weight outlives its op.

``torch.compile`` traces it (a traceable wrapper subclass: checked with inductor on the CPU, not on
a GPU). Not combined with: FSDP sharding of the quantised network (its parameters are not plain tensors),
training the quantised weights (they are frozen by construction), in-place changes of a quantised
weight (refused: e.g. merging a LoRA into it).

The config keys (``base_dtype``, ``base_quant_block``) are ``core.quantize.QuantConfig``; inference
reads its own ``base_dtype`` key (inference/config.py).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["QuantizedWeight", "quantize_weight", "quantize_frozen_", "QUANT_DTYPES", "quantized_bytes"]

#: config name -> (code dtype, largest code magnitude)
QUANT_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "float8_e4m3fn": (torch.float8_e4m3fn, 448.0),
}

aten = torch.ops.aten


class QuantizedWeight(torch.Tensor):
    """A frozen weight held as 8-bit ``codes`` (rows, padded columns) and float32 ``scales``
    (rows, blocks); it reports the shape and ``dtype`` (the compute dtype) of the dense weight.

    Any op dequantises it first (:meth:`dequantize`), except the layout ops that keep it
    quantised: ``detach``, ``t``/``transpose`` of a 2-D weight, a row ``slice`` and device moves."""

    codes: torch.Tensor
    scales: torch.Tensor

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                transposed: bool = False) -> "QuantizedWeight":
        out_shape = (shape[1], shape[0]) if transposed else tuple(shape)
        return torch.Tensor._make_wrapper_subclass(cls, out_shape, dtype=dtype, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                 transposed: bool = False) -> None:
        self.codes, self.scales = codes, scales
        self.weight_shape = tuple(shape)   # the dense weight's shape (before any transpose)
        self.transposed = transposed

    def __repr__(self) -> str:  # type: ignore[override]
        return (f"QuantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, codes={self.codes.dtype}, "
                f"blocks={self.scales.shape[1]} per row)")

    def dequantize(self) -> torch.Tensor:
        """The dense weight in the compute dtype (a new tensor)."""
        rows, blocks = self.scales.shape
        cols = math.prod(self.weight_shape[1:])
        w = (self.codes.view(rows, blocks, -1).float() * self.scales[:, :, None]).view(rows, -1)[:, :cols]
        w = w.to(self.dtype).reshape(self.weight_shape)
        return w.t() if self.transposed else w

    # -- subclass protocol (also lets module.to()/torch.compile move and trace it) -------------
    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        return ["codes", "scales"], (self.weight_shape, self.dtype, self.transposed)

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: tuple, outer_size: Any, outer_stride: Any) -> "QuantizedWeight":
        shape, dtype, transposed = meta
        return QuantizedWeight(inner["codes"], inner["scales"], shape, dtype, transposed)

    def _same(self, codes: torch.Tensor, scales: torch.Tensor, shape: Optional[tuple] = None,
              transposed: Optional[bool] = None) -> "QuantizedWeight":
        return QuantizedWeight(codes, scales, self.weight_shape if shape is None else shape, self.dtype,
                               self.transposed if transposed is None else transposed)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        self = args[0] if args and isinstance(args[0], QuantizedWeight) else None
        if self is not None and func._schema.is_mutable:
            # Changing a dequantised temporary would be lost without a word (e.g. a LoRA merged in place).
            raise RuntimeError(f"a QuantizedWeight is read-only ({func.__name__}); quantise after changing weights")
        if self is not None:
            kept = self._layout_op(func, args[1:], kwargs)
            if kept is not None:
                return kept

        def dense(t: Any) -> Any:
            return t.dequantize() if isinstance(t, QuantizedWeight) else t

        return func(*tree_map(dense, args), **tree_map(dense, kwargs))

    def _layout_op(self, func, rest: tuple, kwargs: dict) -> Optional["QuantizedWeight"]:
        """The ops answered without dequantising, or None."""
        if func is aten.detach.default:
            return self._same(self.codes, self.scales)
        if len(self.weight_shape) == 2 and (func is aten.t.default or (
                func is aten.transpose.int and sorted(d % 2 for d in rest[:2]) == [0, 1])):
            return self._same(self.codes, self.scales, transposed=not self.transposed)
        if func is aten.slice.Tensor and not self.transposed:
            dim, start, end, step = (list(rest) + [0, None, None, 1])[:4]
            if dim == 0 and step == 1:
                rows = self.weight_shape[0]
                start, end = slice(start, end).indices(rows)[:2]
                return self._same(self.codes[start:end], self.scales[start:end],
                                  shape=(max(end - start, 0),) + self.weight_shape[1:])
        if func is aten._to_copy.default and kwargs.get("dtype", self.dtype) == self.dtype:
            device = kwargs.get("device") or self.device
            non_blocking = bool(kwargs.get("non_blocking", False))
            return self._same(self.codes.to(device, non_blocking=non_blocking),
                              self.scales.to(device, non_blocking=non_blocking))
        return None


def quantize_weight(weight: torch.Tensor, dtype: str, block_size: int = 64) -> QuantizedWeight:
    """``weight`` (>= 2-D; rows = dim 0) quantised to ``dtype`` (a :data:`QUANT_DTYPES` name) with
    one scale per ``block_size`` weights of a row (0 = per row); it computes in ``weight.dtype``."""
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"unknown quantised dtype {dtype!r}; known: {', '.join(QUANT_DTYPES)}")
    code_dtype, qmax = QUANT_DTYPES[dtype]
    w = weight.detach()
    rows = w.shape[0]
    flat = w.reshape(rows, -1).float()
    cols = flat.shape[1]
    block = cols if block_size <= 0 else min(int(block_size), cols)
    blocks = -(-cols // block)
    if blocks * block != cols:
        flat = torch.nn.functional.pad(flat, (0, blocks * block - cols))
    grouped = flat.view(rows, blocks, block)
    # An all-zero block keeps scale 1 (codes 0) instead of 0/0.
    absmax = grouped.abs().amax(dim=2)
    scales = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    scaled = grouped / scales[:, :, None]
    codes = scaled.round().clamp_(-qmax, qmax).to(code_dtype) if code_dtype == torch.int8 else scaled.to(code_dtype)
    return QuantizedWeight(codes.view(rows, blocks * block).contiguous(), scales.contiguous(), tuple(w.shape), w.dtype)


def _targets(module: nn.Module) -> list[str]:
    """Names of ``module``'s own weights this converter quantises."""
    if isinstance(module, nn.Linear):
        return ["weight"]
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return ["weight"]
    if isinstance(module, nn.MultiheadAttention) and isinstance(module.in_proj_weight, torch.Tensor):
        return ["in_proj_weight"]
    return []


def quantize_frozen_(model: nn.Module, dtype: str, block_size: int = 64, min_numel: int = 1024) -> int:
    """Quantise ``model``'s big frozen weights in place (see the module docstring); returns how
    many. Call it after the network is in its compute dtype and BEFORE adapters attach; weights
    that require grad or are already parametrized are refused / skipped."""
    from torch.nn.utils import parametrize

    count = 0
    for name, module in model.named_modules():
        for attr in _targets(module):
            if parametrize.is_parametrized(module, attr):
                continue  # an adapter already sits on it: quantise before attaching adapters
            w = getattr(module, attr)
            if not isinstance(w, nn.Parameter) or isinstance(w, QuantizedWeight) or w.numel() < min_numel:
                continue
            if w.requires_grad:
                raise ValueError(f"quantize_frozen_: {name}.{attr} requires grad; only frozen weights are quantised")
            setattr(module, attr, nn.Parameter(quantize_weight(w, dtype, block_size), requires_grad=False))
            count += 1
    return count


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantised weights' codes + scales, bytes the same weights take dense)."""
    stored = dense = 0
    for p in model.parameters():
        if isinstance(p, QuantizedWeight):
            stored += p.codes.numel() * p.codes.element_size() + p.scales.numel() * p.scales.element_size()
            dense += p.numel() * p.element_size()
    return stored, dense
