"""Config keys of the quantised frozen base (``base_dtype``, ``base_quant_block``); the quantiser
itself is modules/quantize.py (shared with inference)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional

from core.config import doc
from core.errors import UserError

__all__ = ["QuantConfig", "quantize_as_configured"]


@dataclass
class QuantConfig:
    """Keys of the quantised frozen base (this module)."""

    base_dtype: Optional[Literal["int8", "float8_e4m3fn"]] = doc(
        None, "Store the big frozen weights in 8 bits, weight-only: the frozen Stage C under a LoRA/DoRA/ControlNet "
              "and the CLIP text encoder (Linear, dense Conv2d and attention in-projection weights; norms, embeddings, "
              "biases, depthwise convs and layers under 1024 weights stay in frozen_dtype). Compute stays in "
              "frozen_dtype (bf16 on a GPU): each layer dequantises its weight when it runs. int8: symmetric, one "
              "scale per base_quant_block weights of a row; float8_e4m3fn: the same with 8-bit floats. None = no "
              "quantisation. Not with use_fsdp (sharding needs plain tensors).")
    base_quant_block: int = doc(64, "Weights per scale of base_dtype, along each output row (0 = one scale per row). "
                                    "Smaller blocks: lower error, more scale memory (4 bytes per block).")

    def validate_quant(self) -> None:
        if self.base_quant_block < 0:
            raise UserError(f"config key 'base_quant_block' must be >= 0 (0 = one scale per row), got "
                            f"{self.base_quant_block}")
        if self.base_dtype is not None and getattr(self, "use_fsdp", False):
            raise UserError(f"config key 'base_dtype: {self.base_dtype}' does not combine with use_fsdp: true (FSDP "
                            f"shards plain tensors, not quantised weights); set one of them off")


def quantize_as_configured(module: Any, cfg: Any) -> Any:
    """Quantise ``module``'s big frozen weights in place to ``cfg.base_dtype`` with
    ``cfg.base_quant_block`` (modules/quantize.py); nothing when unset. Returns ``module``."""
    dtype = getattr(cfg, "base_dtype", None)
    if dtype:
        from modules.quantize import quantize_frozen_, quantized_bytes

        n = quantize_frozen_(module, dtype, cfg.base_quant_block)
        stored, dense = quantized_bytes(module)
        logging.getLogger(__name__).info("%s: %d weights stored in %s (%.1f MiB instead of %.1f MiB)",
                                         type(module).__name__, n, dtype, stored / 2**20, dense / 2**20)
    return module
