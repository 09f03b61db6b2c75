"""What every adapter module shares without importing another: the error type and the 0/0 guard."""
from __future__ import annotations

import torch

#: the smallest normal float32: the guard against 0/0 (a zero row has no direction)
TINY = torch.finfo(torch.float32).tiny


class AdapterError(ValueError):
    """An adapter record or option does not fit (wrong shapes, unknown kind, missing tensors)."""
