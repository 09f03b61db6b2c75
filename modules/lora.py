"""LoRA, DoRA and ReToken as torch parametrizations (docs/OFFICIAL.md, LoRA and ReToken).

``apply_lora`` attaches :class:`LoRA` (or, with ``lora_type="dora"``, :class:`DoRA`) to weights so the state-dict keys become the official
``...parametrizations.<name>.original`` / ``.0.lora_down`` / ``.0.lora_up``. The helpers at the end
build the official positional LoRA checkpoint layout (``weights.{i}.lora_*`` + ``embeddings.*``)
and a self-describing named layout. No I/O happens here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize


class LoRA(nn.Module):
    """Low-rank update W + (lora_up @ lora_down) * alpha/rank of ``getattr(layer, name)``.

    ``lora_down`` (rank, in) starts at zero and ``lora_up`` (out, rank) ~ N(0, 1), so a fresh LoRA
    leaves the layer unchanged. The default alpha=1 gives the official scale 1/rank. The update is
    broadcast over trailing kernel dims of conv weights. ``enabled=False`` bypasses it.
    """

    def __init__(self, layer: nn.Module, name: str = "weight", rank: int = 16, alpha: Optional[float] = None):
        super().__init__()
        w = getattr(layer, name)
        if w.dim() < 2:
            raise ValueError(f"LoRA needs a weight with at least 2 dims, {name} has shape {tuple(w.shape)}")
        self.rank = rank
        self.alpha = 1.0 if alpha is None else float(alpha)
        self.scale = self.alpha / rank
        self.lora_down = nn.Parameter(torch.zeros(rank, w.size(1), device=w.device, dtype=w.dtype))
        self.lora_up = nn.Parameter(torch.randn(w.size(0), rank, device=w.device, dtype=w.dtype))
        self.enabled = True

    def forward(self, original_weights: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return original_weights
        delta = torch.matmul(self.lora_up, self.lora_down) * self.scale
        shape = delta.shape + (1,) * (original_weights.dim() - 2)
        # The LoRA may be kept in float32 on a bf16 base: the weight keeps the base dtype.
        return original_weights + delta.view(shape).to(original_weights.dtype)


LORA_TYPES = ("lora", "dora")


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """Float32 L2 norm of each output row of ``weight`` (over all dims but dim 0: a conv's input
    channels and kernel positions), shape (out,). The DoRA magnitude's unit."""
    return weight.float().flatten(1).norm(dim=1)


def dora_weight(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's weight ``m * V / ||V||_row`` with ``V = base + delta`` (float32, shape of ``base``).

    ``delta`` broadcasts over trailing kernel dims of a conv ``base``; ``magnitude`` is (out,).
    This is the one definition of the DoRA math: the trainable :class:`DoRA` and the merge rule
    (``modules.lora_formats.merged_weight``) both call it, so merged == attached.
    """
    v = base.float() + delta.float().view(delta.shape + (1,) * (base.dim() - delta.dim()))
    # A zero row has no direction: keep it zero instead of 0/0 (never the case for trained weights).
    scale = magnitude.float() / row_norms(v).clamp_min(torch.finfo(torch.float32).tiny)
    return v * scale.view((-1,) + (1,) * (base.dim() - 1))


class DoRA(LoRA):
    """Weight-decomposed LoRA (Liu et al. 2024, "DoRA"): ``m * (W + ΔW) / ||W + ΔW||_row`` with the
    LoRA update ``ΔW = lora_up @ lora_down * alpha/rank`` giving the direction and a trainable
    ``magnitude`` (out,) per output row (a conv: per output channel, norm over the rest).

    ``magnitude`` starts at the row norms of the base weight and ``lora_down`` at zero, so a fresh
    DoRA reproduces the base weight bit for bit (the same norm is computed twice: m / ||W|| == 1).
    The norm is differentiated through (not detached as in the paper's memory-saving variant): it
    is a per-weight, not per-activation, cost here. ``enabled=False`` bypasses it.
    """

    def __init__(self, layer: nn.Module, name: str = "weight", rank: int = 16, alpha: Optional[float] = None):
        super().__init__(layer, name, rank, alpha)
        w = getattr(layer, name)
        # float32 whatever the base dtype: a bf16-rounded m would not give m / ||W|| == 1 at init.
        self.magnitude = nn.Parameter(row_norms(w.detach()))

    def forward(self, original_weights: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return original_weights
        delta = torch.matmul(self.lora_up, self.lora_down) * self.scale
        return dora_weight(original_weights, delta, self.magnitude).to(original_weights.dtype)


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


def apply_lora(model: nn.Module, filters: Optional[Sequence[str]] = None, rank: int = 16,
               alpha: Optional[float] = None, lora_type: str = "lora") -> List[Tuple[str, LoRA]]:
    """Attach LoRA (``lora_type="dora"``: :class:`DoRA`) to every module whose qualified name
    contains any filter substring.

    Returns ``[(target, lora)]`` with targets such as ``down_blocks.0.2.attention.attn.in_proj_weight``
    in the official ``model.modules()`` order (``lora_targets``: an attention's out_proj LoRA before
    its in_proj LoRA), which is the order of the official checkpoint's ``weights.{i}``.
    """
    if lora_type not in LORA_TYPES:
        raise ValueError(f"apply_lora: lora_type must be one of {LORA_TYPES}, got {lora_type!r}")
    kind = DoRA if lora_type == "dora" else LoRA
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
        lora = kind(m, attr, rank=rank, alpha=alpha)
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
            if not any(isinstance(p, (LoRA, ReToken)) for p in plist):
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


def lora_state_dict_named(loras: Sequence[Tuple[str, LoRA]]) -> Dict[str, torch.Tensor]:
    """Keys named by target, e.g. ``down_blocks.0.2.attention.attn.in_proj_weight.lora_down``."""
    sd: Dict[str, torch.Tensor] = {}
    for name, lora in loras:
        sd[f"{name}.lora_down"] = lora.lora_down.detach()
        sd[f"{name}.lora_up"] = lora.lora_up.detach()
    return sd


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
