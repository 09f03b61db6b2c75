"""Replay LoRA-trained tokens into the tokenizer and CLIP text embedding (training.md 7.1).

Training adds each new token (``[name]`` or ``<name>``) to the tokenizer and appends one embedding
row, initialised to the mean of the rows whose vocabulary string matches the init regex. The LoRA
file only stores the trained DELTAS for the rows listed in ``embeddings.indices``; replaying the
same ``train_tokens`` in the same order recreates the ids those indices refer to.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch

from inference.errors import UserError


def _is_new_token(spec: str) -> bool:
    return (spec.startswith("[") and spec.endswith("]")) or (spec.startswith("<") and spec.endswith(">"))


def _token_embedding(text_model: Any) -> torch.nn.Embedding:
    return text_model.get_input_embeddings()


@torch.no_grad()
def add_train_tokens(tokenizer: Any, text_model: Any,
                     train_tokens: Optional[Sequence[Sequence[Optional[str]]]]) -> list[int]:
    """Add the NEW tokens of ``train_tokens`` (in list order); returns their ids.

    Regex specs (existing tokens) need no replay: their ids do not change. A token that is already
    in the vocabulary is left alone, so calling this twice is harmless.
    """
    added: list[int] = []
    for entry in train_tokens or ():
        if not entry or not isinstance(entry[0], str):
            raise UserError(f"train_tokens entry {entry!r} must be [token_or_regex, init_regex_or_null]")
        spec = entry[0]
        init = entry[1] if len(entry) > 1 else None
        if not _is_new_token(spec) or spec in tokenizer.get_vocab():
            continue
        embedding = _token_embedding(text_model)
        rows = embedding.weight.size(0)
        try:
            pattern = re.compile(init) if init else None
        except re.error as exc:
            raise UserError(f"train_tokens: init regex {init!r} is invalid ({exc})") from None
        matches = [i for tok, i in tokenizer.get_vocab().items()
                   if pattern is not None and pattern.search(tok) and i < rows]
        tokenizer.add_tokens([spec])
        new_id = tokenizer.convert_tokens_to_ids(spec)
        weight = embedding.weight
        row = weight[matches].float().mean(0) if matches else torch.zeros(weight.size(1))
        if new_id >= rows:
            text_model.resize_token_embeddings(new_id + 1, mean_resizing=False)
            weight = _token_embedding(text_model).weight
        weight[new_id] = row.to(weight.dtype)
        added.append(int(new_id))
    return added


@torch.no_grad()
def apply_token_deltas(text_model: Any, indices: torch.Tensor, deltas: torch.Tensor,
                       strength: float = 1.0, source: str = "LoRA file") -> None:
    """Add ``strength * deltas[i]`` to embedding row ``indices[i]`` (the trained ReToken offsets)."""
    weight = _token_embedding(text_model).weight
    if deltas.dim() != 2 or deltas.size(1) != weight.size(1):
        raise UserError(f"{source}: token embeddings have width {tuple(deltas.shape)[1:]} but the "
                        f"CLIP text model has {weight.size(1)}; wrong clip_text_model_name?")
    if indices.numel() and int(indices.max()) >= weight.size(0):
        raise UserError(f"{source}: trained token id {int(indices.max())} is beyond the vocabulary "
                        f"({weight.size(0)} rows); set train_tokens in the config (as in training) "
                        f"so the new tokens are added first")
    weight.index_add_(0, indices.to(weight.device).long(),
                      (deltas.float() * float(strength)).to(weight.device, weight.dtype))
