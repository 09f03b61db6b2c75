"""The adapter interface: one trainable change of one weight, and its file record.

An :class:`Adapter` is a torch parametrization of a module's weight (``forward(W) -> W'``). Each
kind (LoRA, DoRA, LoKr, LoHa, ...) is one subclass registered with :func:`register`; everything
outside this package asks the registry (:func:`kind`) and never names a kind. A kind owns:

* its trainable tensors (``self.tensors()``: name -> parameter, the names of the ``named`` file
  layout) and which of them are "up"/B matrices (``up_names``, LoRA+'s faster learning rate);
* its math, once, on a plain dict of tensors (:meth:`Adapter.record_delta` /
  :meth:`Adapter.record_weight`), used both by the trainable module and by merging a file record,
  so merged == attached by construction;
* its parameter count for a weight shape (:meth:`Adapter.param_count`, the memory estimate's);
* its tensor names per file style (:attr:`Adapter.file_names`) and which styles can hold it.

A file entry is an :class:`AdapterEntry`: ``kind`` + ``tensors`` + ``alpha`` (+ the q/k/v block
of a packed attention projection), nothing LoRA-specific.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from modules.adapters.dora import tool_decompose
from modules.adapters.errors import TINY, AdapterError  # noqa: F401  (re-exported)



@dataclass
class AdapterEntry:
    """One adapter of parameter ``target`` as read from (or written to) a file: its ``kind``,
    its tensors by kind-defined name, ``alpha`` (None: the kind's default for a file without one)
    and ``block`` 0/1/2 when it adapts only the q/k/v third of a packed ``in_proj_weight``.

    Tool-specific DoRA tensors (``dora_scale``) travel in ``tensors`` too: see
    :func:`modules.adapters.dora.tool_decompose`."""

    target: str
    kind: str
    tensors: Dict[str, torch.Tensor]
    alpha: Optional[float] = None
    block: Optional[int] = None
    notes: Dict[str, Any] = field(default_factory=dict)

    @property
    def adapter(self) -> Type["Adapter"]:
        return kind(self.kind)

    @property
    def rank(self) -> int:
        return self.adapter.record_rank(self.tensors)


_KINDS: Dict[str, Type["Adapter"]] = {}


def register(cls: Type["Adapter"]) -> Type["Adapter"]:
    """Class decorator: make ``cls`` available as ``lora_type: <cls.kind>``."""
    if not cls.kind or cls.kind in _KINDS:
        raise ValueError(f"adapter kind {cls.kind!r} is empty or registered twice")
    _KINDS[cls.kind] = cls
    return cls


def kind(name: str) -> Type["Adapter"]:
    """The adapter class registered as ``name`` (AdapterError naming the known kinds)."""
    try:
        return _KINDS[name]
    except KeyError:
        raise AdapterError(f"unknown adapter kind {name!r} (known: {', '.join(_KINDS)})") from None


def kinds() -> Tuple[str, ...]:
    """The registered kind names, in registration order."""
    return tuple(_KINDS)


def kind_of_tensors(names: Sequence[str]) -> Optional[str]:
    """The kind whose tensors ``names`` are (a file record's tensor names), or None."""
    for cls in reversed(list(_KINDS.values())):  # the more specific (later) kinds first
        if cls.owns(set(names)):
            return cls.kind
    return None


def view_as(delta: torch.Tensor, shape: Sequence[int], what: str) -> torch.Tensor:
    """``delta`` with exactly ``shape``: a 2-D (out, in) delta of a conv weight broadcasts over the
    kernel; anything else must already have the shape (never a reshape of a same-size tensor:
    that is how a non-delta, such as OneTrainer's depthwise branch, would merge silently wrong)."""
    shape = tuple(shape)
    if tuple(delta.shape) == shape:
        return delta
    if delta.dim() == 2 and len(shape) > 2 and tuple(delta.shape) == shape[:2]:
        return delta.view(*delta.shape, *(1,) * (len(shape) - 2)).expand(shape)
    if delta.dim() == 2 and len(shape) > 2 and tuple(delta.shape) == (shape[0], int(torch.Size(shape[1:]).numel())):
        return delta.view(shape)  # a kernel-flattened (out, in*kh*kw) delta, as LyCORIS builds it
    raise AdapterError(f"{what}: its update has shape {tuple(delta.shape)}, the weight {shape}")


class Adapter(nn.Module):
    """A trainable adapter of one weight (a parametrization); subclasses define the kind.

    ``rank`` and ``alpha`` (None: 1.0, the official scale 1/rank) are the common options; a kind
    may take more (``**options``, e.g. LoKr's ``factor``). ``enabled=False`` bypasses it.
    """

    kind: ClassVar[str] = ""
    #: its name in messages ("LoRA", "DoRA", ...)
    title: ClassVar[str] = ""
    #: tensors trained with ``lr * lora_plus_ratio`` (LoRA+: the up/B matrices)
    up_names: ClassVar[Tuple[str, ...]] = ()
    #: file style -> {our tensor name: the file's tensor name}; styles not listed cannot hold the kind
    file_names: ClassVar[Dict[str, Dict[str, str]]] = {}
    #: kind option -> the job's config key that sets it (e.g. LoKr's ``factor`` <- ``lokr_factor``)
    config_options: ClassVar[Dict[str, str]] = {}
    #: writing it in another tool's form needs the frozen base weight (a DoRA's dora_scale)
    needs_base: ClassVar[bool] = False

    @classmethod
    def options_from(cls, cfg: Any) -> Dict[str, Any]:
        """This kind's options as set in a job config (``config_options``; unset keys: the kind's default)."""
        options = {opt: getattr(cfg, key, None) for opt, key in cls.config_options.items()}
        return {opt: value for opt, value in options.items() if value is not None}

    def __init__(self, layer: Any, name: str = "weight", rank: int = 16, alpha: Optional[float] = None,
                 **options: Any):
        super().__init__()
        # ``layer`` is the module whose ``name`` weight is adapted, or that weight itself
        weight = getattr(layer, name) if isinstance(layer, nn.Module) else layer
        if weight.dim() < 2:
            raise AdapterError(f"{self.kind} needs a weight with at least 2 dims, got shape {tuple(weight.shape)}")
        if rank < 1:
            raise AdapterError(f"{self.kind}: rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.alpha = 1.0 if alpha is None else float(alpha)
        self.scale = self.alpha / self.rank
        self.weight_shape = tuple(weight.shape)
        self.enabled = True

    # -- the trainable module --------------------------------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        """Its trainable tensors by name (the names of the ``named`` file layout)."""
        return dict(self.named_parameters(recurse=False))

    def up_parameters(self) -> list:
        """The parameters LoRA+ trains with the larger learning rate."""
        return [p for n, p in self.tensors().items() if n in self.up_names]

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return original
        # The adapter may be kept in float32 on a bf16 base: the weight keeps the base dtype.
        return type(self).record_weight(original, self.tensors(), self.alpha).to(original.dtype)

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        """Copy a record's tensors (same names and shapes) into the parameters (strict)."""
        ours = self.tensors()
        if set(tensors) != set(ours):
            raise AdapterError(f"{what}: holds {sorted(tensors)}, this {self.kind} has {sorted(ours)}")
        for name, p in ours.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise AdapterError(f"{what}: {name} has shape {tuple(tensors[name].shape)}, this run's "
                                   f"{self.kind} needs {tuple(p.shape)} (rank {self.rank}); set rank (and the "
                                   f"kind's options) as the file was trained")
            p.copy_(tensors[name].to(p.dtype))

    # -- the math on plain tensors (also for file records) -----------------------------------
    @classmethod
    def record_delta(cls, tensors: Mapping[str, torch.Tensor], alpha: Optional[float],
                     shape: Sequence[int]) -> torch.Tensor:
        """The float32 additive update (exactly ``shape``) of a record of this kind."""
        raise NotImplementedError

    @classmethod
    def record_weight(cls, base: torch.Tensor, tensors: Mapping[str, torch.Tensor],
                      alpha: Optional[float]) -> torch.Tensor:
        """The adapted weight (float32) for base weight ``base``: ``W + delta`` unless the kind
        says otherwise (DoRA); a record carrying another tool's ``dora_scale`` is decomposed the
        way that tool does it (:func:`modules.adapters.dora.tool_decompose`)."""
        delta = cls.record_delta(tensors, alpha, tuple(base.shape)).to(base.device)
        if "dora_scale" in tensors:
            return tool_decompose(base, delta, tensors["dora_scale"], cls.kind)
        return base.float() + delta

    #: the tensors whose dim 0 is the rank, the first present counts (none: rank 1)
    rank_tensors: ClassVar[Tuple[str, ...]] = ()
    #: a record of this kind has all of these tensors and one whose name starts with ``prefix``
    required: ClassVar[frozenset] = frozenset()
    prefix: ClassVar[str] = ""

    @classmethod
    def record_rank(cls, tensors: Mapping[str, torch.Tensor]) -> int:
        return next((int(tensors[n].shape[0]) for n in cls.rank_tensors if n in tensors), 1)

    @classmethod
    def owns(cls, names: set) -> bool:
        """Whether a record with tensor ``names`` is of this kind."""
        return cls.required <= names and any(n.startswith(cls.prefix) for n in names)

    @classmethod
    def record_problem(cls, tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
        """Why a record of this kind is inconsistent in itself (a damaged file), or None."""
        return None

    @classmethod
    def param_count(cls, shape: Sequence[int], rank: int, **options: Any) -> int:
        """Trainable parameters of this kind on a weight of ``shape`` (the memory estimate's)."""
        raise NotImplementedError

    # -- files -----------------------------------------------------------------------------
    @classmethod
    def file_record(cls, tensors: Mapping[str, torch.Tensor], alpha: float, shape: Sequence[int], style: str,
                    dora_form: Optional[str], base: Optional[torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
        """The record's tensors as file style ``style`` holds them (our tensor names; a DoRA may
        become a tool's ``dora_scale`` of form ``dora_form``); AdapterError when the style cannot
        hold this kind. The default: unchanged."""
        if style not in cls.file_names:
            raise AdapterError(f"{what}: a {cls.kind} cannot be written in this layout (it holds "
                               f"{', '.join(k for k in _KINDS if style in _KINDS[k].file_names)})")
        return dict(tensors)

    @classmethod
    def from_file(cls, tensors: Mapping[str, torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
        """A file's tensors (already renamed to ours) in this kind's canonical shapes."""
        return dict(tensors)

    @classmethod
    def split_rows(cls, tensors: Mapping[str, torch.Tensor], parts: int, what: str) -> list:
        """``parts`` records, each the update of its share of the output rows (a packed q/k/v
        projection written as three), or AdapterError when the kind's factors cannot be split."""
        raise AdapterError(f"{what}: a {cls.kind} cannot be split into {parts} row blocks")

    @classmethod
    def join_rows(cls, records: Sequence[Tuple[Mapping[str, torch.Tensor], float]], alpha: float,
                  what: str) -> Dict[str, torch.Tensor]:
        """One record (scale ``alpha``) equal to the row-wise concatenation of ``records``
        (``(tensors, alpha)`` each), or AdapterError when that is not a record of this kind."""
        raise AdapterError(f"{what}: {len(records)} row blocks of a {cls.kind} cannot be joined into one")


def scale_of(alpha: Optional[float], rank: int) -> float:
    """The LoRA-family scale ``alpha / rank`` (alpha None: ``rank``, i.e. scale 1)."""
    return (float(rank) if alpha is None else float(alpha)) / rank
