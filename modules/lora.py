"""Attaching adapters (LoRA, DoRA, LoKr, LoHa: ``modules.adapters``) and ReToken as torch
parametrizations (docs/OFFICIAL.md, LoRA and ReToken).

``apply_lora`` attaches the adapter kind ``lora_type`` (any registered kind) to weights so the
state-dict keys become the official ``...parametrizations.<name>.original`` / ``.0.lora_down`` /
``.0.lora_up`` for a LoRA. The helpers at the end
build the official positional LoRA checkpoint layout (``weights.{i}.lora_*`` + ``embeddings.*``)
and a self-describing named layout. No I/O happens here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from modules.adapters import Adapter, DoRA, LoRA, kind, kinds  # noqa: F401  (re-exported)
from modules.adapters.dora import dora_weight, row_norms  # noqa: F401  (re-exported)


# The adapter kinds live in modules.adapters (one interface, a registry); these names stay importable here.
LORA_TYPES = kinds()


class ReToken(nn.Module):
    """Adds trainable offsets ``embeddings[i]`` to rows ``indices[i]`` of a token-embedding table."""

    def __init__(self, indices: Sequence[int], width: int = 1280):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(len(indices), width))
        self.register_buffer("indices", torch.as_tensor(list(indices), dtype=torch.long))
        self.enabled = True

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return embeddings
        return embeddings.index_add(0, self.indices.to(embeddings.device), self.embeddings.to(embeddings.dtype))


def apply_retoken(embedding_module: nn.Module, indices: Sequence[int]) -> ReToken:
    """Register a ReToken on ``embedding_module.weight`` (width taken from the table)."""
    weight = embedding_module.weight
    retoken = ReToken(indices, width=weight.size(1)).to(device=weight.device, dtype=weight.dtype)
    retoken._param_order = list(embedding_module._parameters)
    parametrize.register_parametrization(embedding_module, "weight", retoken)
    return retoken


def _target(module: nn.Module) -> Optional[str]:
    # 1-D weights (affine norms) cannot carry a low-rank update; the original would crash on them.
    w = getattr(module, "weight", None)
    if isinstance(w, nn.Parameter) and w.dim() >= 2 and not parametrize.is_parametrized(module, "weight"):
        return "weight"
    if isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
        return "in_proj_weight"
    return None


def _no_match_message(model: nn.Module, filters: Optional[Sequence[str]]) -> str:
    # Show name patterns (indices as '*') so the hint covers the whole model in a few entries.
    patterns = list(dict.fromkeys(
        ".".join("*" if part.isdigit() else part for part in n.split("."))
        for n, m in model.named_modules() if _target(m) is not None))
    return (f"apply_lora: filters {list(filters or [])} match no module with a weight; "
            f"module names look like {patterns[:12]}")


def lora_targets(model: nn.Module, filters: Optional[Sequence[str]] = None) -> List[str]:
    """The parameters ``apply_lora(model, filters)`` adapts, in the order it returns them (the
    official ``model.modules()`` order that gives ``weights.{i}`` of the positional layout its
    meaning), computed without modifying ``model``. Raises ValueError when nothing matches.

    A LoRA lives in its module's ``parametrizations`` child, registered after the module's own
    children, so ``model.modules()`` reaches it right after the module's whole subtree: the order
    is by the end of that subtree, the deeper module first on ties (out_proj before in_proj).
    """
    if isinstance(filters, str):
        filters = [filters]
    names = [n for n, _ in model.named_modules()]
    # named_modules() is a pre-order walk, so each subtree is a contiguous run of positions.
    ends = list(range(len(names)))
    open_: List[int] = []
    for i, name in enumerate(names):
        while open_ and not (names[open_[-1]] == "" or name.startswith(names[open_[-1]] + ".")):
            ends[open_.pop()] = i - 1
        open_.append(i)
    for j in open_:
        ends[j] = len(names) - 1
    chosen = []
    for i, (name, module) in enumerate(model.named_modules()):
        if filters is not None and not any(f in name for f in filters):
            continue
        attr = _target(module)
        if attr is not None:
            chosen.append((ends[i], -i, f"{name}.{attr}" if name else attr))
    if not chosen:
        raise ValueError(_no_match_message(model, filters))
    return [target for _end, _depth, target in sorted(chosen)]


def row_blocks(target: str) -> int:
    """3 for a packed q/k/v projection (``in_proj_weight``), else 1: a kind whose factors must be
    split with the q/k/v rows (LoKr's w1) is built to allow it."""
    return 3 if target.endswith("in_proj_weight") else 1


def adapter_param_count(shapes: Dict[str, Sequence[int]], targets: Sequence[str], lora_type: str, rank: int,
                        **options) -> int:
    """Trainable parameters of kind ``lora_type`` on ``targets`` (``shapes``: parameter -> shape),
    from the kind's own count (the dry run's description and the memory estimate)."""
    adapter = kind(lora_type)
    return sum(adapter.param_count(shapes[t], rank, row_blocks=row_blocks(t), **options) for t in targets)


def apply_lora(model: nn.Module, filters: Optional[Sequence[str]] = None, rank: int = 16,
               alpha: Optional[float] = None, lora_type: str = "lora", **options) -> List[Tuple[str, Adapter]]:
    """Attach an adapter of kind ``lora_type`` (``modules.adapters.kinds()``; ``options`` go to the
    kind, e.g. LoKr's ``factor``) to every module whose qualified name contains any filter substring.

    Returns ``[(target, lora)]`` with targets such as ``down_blocks.0.2.attention.attn.in_proj_weight``
    in the official ``model.modules()`` order (``lora_targets``: an attention's out_proj LoRA before
    its in_proj LoRA), which is the order of the official checkpoint's ``weights.{i}``.
    """
    if lora_type not in kinds():
        raise ValueError(f"apply_lora: lora_type must be one of {kinds()}, got {lora_type!r}")
    adapter = kind(lora_type)
    if isinstance(filters, str):
        filters = [filters]
    order = lora_targets(model, filters)
    wanted = set(order)
    made: Dict[str, LoRA] = {}
    # Registration follows module order: each LoRA draws its lora_up from the global RNG here.
    for n, m in list(model.named_modules()):
        attr = _target(m)
        target = (f"{n}.{attr}" if n else attr) if attr is not None else None
        if target not in wanted:
            continue
        lora = adapter(m, attr, rank=rank, alpha=alpha, row_blocks=row_blocks(target), **options)
        lora._param_order = list(m._parameters)  # lets remove_lora restore the state-dict order
        parametrize.register_parametrization(m, attr, lora)
        made[target] = lora
    return [(target, made[target]) for target in order]


def remove_lora(model: nn.Module, leave_parametrized: bool = True) -> None:
    """Remove LoRA/ReToken parametrizations; with ``leave_parametrized`` the updates are folded in."""
    for m in list(model.modules()):
        if not parametrize.is_parametrized(m):
            continue
        for name in list(m.parametrizations.keys()):
            plist = m.parametrizations[name]
            if not any(isinstance(p, (Adapter, ReToken)) for p in plist):
                continue
            order = next((p._param_order for p in plist if hasattr(p, "_param_order")), None)
            parametrize.remove_parametrizations(m, name, leave_parametrized=leave_parametrized)
            if order is not None and set(order) == set(m._parameters):
                # Re-registering appended the weight at the end; put it back where it was.
                m._parameters = type(m._parameters)((k, m._parameters[k]) for k in order)


def _modules_of(loras: Sequence[Union[LoRA, Tuple[str, LoRA]]]) -> List[LoRA]:
    return [x[1] if isinstance(x, tuple) else x for x in loras]


def lora_state_dict_official(loras: Sequence[Union[LoRA, Tuple[str, LoRA]]],
                             retoken: Optional[ReToken] = None) -> Dict[str, torch.Tensor]:
    """The official LoRA file layout: ``embeddings.embeddings``, ``embeddings.indices``, then
    ``weights.{i}.lora_down`` / ``weights.{i}.lora_up`` in the order of ``loras``."""
    sd: Dict[str, torch.Tensor] = {}
    if retoken is not None:
        sd["embeddings.embeddings"] = retoken.embeddings.detach()
        sd["embeddings.indices"] = retoken.indices.detach()
    for i, lora in enumerate(_modules_of(loras)):
        sd[f"weights.{i}.lora_down"] = lora.lora_down.detach()
        sd[f"weights.{i}.lora_up"] = lora.lora_up.detach()
    return sd


def lora_module_dict(loras: Sequence[Union[LoRA, Tuple[str, LoRA]]], retoken: Optional[ReToken] = None
                     ) -> nn.ModuleDict:
    """The official trainable container {'embeddings': ReToken, 'weights': ModuleList(LoRA)}.

    Its ``state_dict()`` is the official LoRA file layout; its parameters are what gets optimised.
    """
    d = nn.ModuleDict()
    if retoken is not None:
        d["embeddings"] = retoken
    d["weights"] = nn.ModuleList(_modules_of(loras))
    return d


def lora_state_dict_named(loras: Sequence[Tuple[str, Adapter]]) -> Dict[str, torch.Tensor]:
    """Keys named by target and the kind's tensor names, e.g.
    ``down_blocks.0.2.attention.attn.in_proj_weight.lora_down`` (detached, not copied)."""
    return {f"{name}.{key}": t.detach() for name, adapter in loras for key, t in adapter.tensors().items()}


@torch.no_grad()
def load_lora_state_dict_official(loras: Sequence[Union[LoRA, Tuple[str, LoRA]]], state_dict: Dict[str, torch.Tensor],
                                  retoken: Optional[ReToken] = None, source: str = "LoRA state dict") -> None:
    """Copy an official-layout LoRA state dict into ``loras`` (and ``retoken``); strict on keys/shapes.

    A mismatch raises :class:`modules.loading.StateDictMismatchError` (a ValueError and a
    CheckpointError) and loads nothing.
    """
    from modules.loading import load_state_dict_strict

    # The official container's state dict IS the official file layout (see lora_module_dict).
    load_state_dict_strict(lora_module_dict(loras, retoken), state_dict, source,
                           hint="for this LoRA layout (rank/filters/token count?)")
