"""Adapters as plug-ins: one interface (:class:`Adapter`), a registry of kinds (``lora``,
``dora``, ``lokr``, ``loha``) and the generic file record (:class:`AdapterEntry`).

Adding a kind = one module with an :class:`Adapter` subclass decorated with :func:`register`,
imported here, plus its tests. Nothing outside this package branches on a kind's name.
"""
from modules.adapters.base import (Adapter, AdapterEntry, AdapterError, kind, kind_of_tensors, kinds, register,
                                   view_as)
from modules.adapters import lora as _lora  # noqa: F401  (registers lora, dora)
from modules.adapters import lokr as _lokr  # noqa: F401  (registers lokr)
from modules.adapters import loha as _loha  # noqa: F401  (registers loha)
from modules.adapters.lora import DoRA, LoRA
from modules.adapters.lokr import LoKr
from modules.adapters.loha import LoHa

__all__ = ["Adapter", "AdapterEntry", "AdapterError", "kind", "kinds", "kind_of_tensors", "register", "view_as",
           "LoRA", "DoRA", "LoKr", "LoHa"]
