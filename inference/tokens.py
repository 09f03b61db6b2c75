"""Replay LoRA-trained tokens into the tokenizer and CLIP text embedding (docs/OFFICIAL.md, LoRA tokens).

Training (``modules.lora_tokens``) adds each new token (``[name]`` or ``<name>``) to the tokenizer and appends one embedding
row, initialised to the mean of the rows whose vocabulary string matches the init regex. The LoRA
file only stores the trained DELTAS for the rows listed in ``embeddings.indices``; replaying the
same ``train_tokens`` in the same order recreates the ids those indices refer to.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch

from inference.errors import UserError
from modules.lora_tokens import TrainTokensError
from modules.lora_tokens import add_train_tokens as _add_train_tokens


def _token_embedding(text_model: Any) -> torch.nn.Embedding:
    return text_model.get_input_embeddings()


def add_train_tokens(tokenizer: Any, text_model: Any,
                     train_tokens: Optional[Sequence[Sequence[Optional[str]]]]) -> list[int]:
    """Replay ``train_tokens`` exactly as the LoRA trainer does (``modules.lora_tokens``: new tokens,
    mean-initialised rows, first-EOS pooling fix); returns the trained ids."""
    if not train_tokens:
        return []
    try:
        return _add_train_tokens(tokenizer, text_model, train_tokens).ids
    except TrainTokensError as exc:  # inference raises one error type (inference.errors)
        raise UserError(str(exc)) from None


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


# -- LoRA files: their tokens from the file's metadata, checked against the config and the prompts --

#: a prompt word that looks like a trained token: ``[name]`` or ``<name>`` (docs/LORA.md, Tokens)
TRIGGER_RE = re.compile(r"\[[^\[\]\s]+\]|<[^<>\s]+>")


def is_trigger(word: str) -> bool:
    """True for a ``[name]`` / ``<name>`` new-token spelling."""
    return TRIGGER_RE.fullmatch(word) is not None


def check_prompt_tokens(prompts: Sequence[str], trained: Sequence[str], lora_loaded: bool = True) -> list[str]:
    """With a LoRA loaded: UserError for a prompt word spelled like a trained token (``[name]``)
    that no loaded LoRA trained (it would be read as plain text). Returns warnings: such a word
    without any LoRA, and a LoRA's new token that no prompt uses."""
    known = set(trained)
    if not lora_loaded:
        return [f"prompt word {w} looks like a LoRA's trained token, but no LoRA is loaded (--lora PATH); it is "
                f"read as plain text" for w in sorted({w for p in prompts for w in TRIGGER_RE.findall(p)})]
    for prompt in prompts:
        for word in TRIGGER_RE.findall(prompt):
            if word not in known:
                have = sorted(known) if known else "none"
                raise UserError(f"prompt {prompt!r}: {word} looks like a trained token, but the loaded LoRA "
                                f"file(s) trained {have}; it would be read as plain text. Use the LoRA that "
                                f"trained it (--lora PATH) or drop the brackets")
    used = {w for p in prompts for w in TRIGGER_RE.findall(p)}
    return [f"the LoRA trained the token {t} but no prompt uses it (the LoRA's concept is tied to it)"
            for t in trained if t not in used]
