"""Token training for LoRA jobs: ``train_tokens`` -> tokenizer additions + trainable embedding rows.

``train_tokens`` (docs/OFFICIAL.md, LoRA tokens) is a list of ``[token_spec, init_regex_or_null]``:

* ``[name]`` or ``<name>`` is a NEW token: added to the tokenizer, with a new row appended to the
  CLIP token-embedding table, initialised to the mean of the rows whose vocabulary string matches
  ``init_regex`` (``re.search``); ``null`` initialises it to zeros. A regex that matches nothing is
  an error (the official code silently used zeros, which makes training start from nothing).
* anything else is a regex selecting EXISTING vocabulary entries to finetune (no re-init); matching
  nothing is an error.

The selected ids are sorted (the official ``list(set(...))`` order was implementation-defined), and
``apply_retoken`` then adds trainable zero-initialised deltas to exactly those rows: the base table
stays frozen, so every other row is bit-for-bit unchanged.

Pooling: HF's CLIP text model pools at ``argmax(input_ids)`` when its config has the legacy
``eos_token_id == 2`` (the bigG config does); a new token has an id ABOVE the EOS id 49407 and
would steal the pooled position. :func:`fix_eos_pooling` switches such a model to "first EOS id"
pooling, which gives identical results for every prompt without new tokens.

Errors a user can fix raise :class:`TrainTokensError` (a ``CheckpointError``: printed as one line).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from modules.lora_formats import LoraFormatError


class TrainTokensError(LoraFormatError):
    """``train_tokens`` is malformed or does not fit the tokenizer. A LoRA file's
    ``embeddings.indices`` only mean something with the token list that created them, so this is
    part of reading the LoRA format."""


def is_new_token(spec: str) -> bool:
    """``[name]`` / ``<name>`` add a token; anything else is a regex over the vocabulary."""
    return len(spec) > 2 and ((spec[0] == "[" and spec[-1] == "]") or (spec[0] == "<" and spec[-1] == ">"))


@dataclass
class TrainedTokens:
    """What ``add_train_tokens`` did: the trained ids (sorted) and the new tokens' details."""

    ids: list[int] = field(default_factory=list)
    new_tokens: list[dict] = field(default_factory=list)   # {token, id, init_regex, init_count}
    existing: list[dict] = field(default_factory=list)     # {regex, ids}
    vocab_size_before: int = 0

    def token_strings(self, tokenizer: Any) -> list[str]:
        return [str(t) for t in tokenizer.convert_ids_to_tokens(self.ids)]

    def to_json(self, tokenizer: Any) -> dict:
        return {"ids": self.ids, "tokens": self.token_strings(tokenizer), "new_tokens": self.new_tokens,
                "existing": self.existing, "vocab_size_before": self.vocab_size_before}


def validate_train_tokens(train_tokens: Any) -> list[tuple[str, Optional[str]]]:
    """Check the shape of the config value; returns ``[(spec, init_regex_or_None)]``."""
    if train_tokens is None:
        return []
    if not isinstance(train_tokens, (list, tuple)):
        raise TrainTokensError("config key 'train_tokens' must be a list of [token_or_regex, init_regex_or_null] pairs")
    out = []
    for i, entry in enumerate(train_tokens):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str) or not entry[0]
                or not (entry[1] is None or isinstance(entry[1], str))):
            raise TrainTokensError(f"config key 'train_tokens' entry {i} ({entry!r}) must be [token_or_regex, "
                                   f"init_regex_or_null], e.g. ['[fernando]', '^dog</w>'] or ['^snail', null]")
        spec, init = entry[0], entry[1]
        for what, pattern in (("token regex", None if is_new_token(spec) else spec), ("init regex", init)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise TrainTokensError(f"config key 'train_tokens' entry {i}: invalid {what} {pattern!r} "
                                           f"({exc})") from None
        if not is_new_token(spec) and init is not None:
            raise TrainTokensError(f"config key 'train_tokens' entry {i}: {spec!r} is an existing-token regex "
                                   f"(no brackets), "
                                   f"so its init regex must be null; write '[{spec}]' to add a new token")
        out.append((spec, init))
    return out


def _matching_ids(vocab: dict[str, int], pattern: str, limit: int) -> list[int]:
    rx = re.compile(pattern)
    return sorted(i for tok, i in vocab.items() if i < limit and rx.search(tok))


@torch.no_grad()
def add_train_tokens(tokenizer: Any, text_model: Any, train_tokens: Any) -> TrainedTokens:
    """Apply ``train_tokens`` (in list order) to ``tokenizer`` and ``text_model``; see module doc."""
    specs = validate_train_tokens(train_tokens)
    embedding = text_model.get_input_embeddings()
    result = TrainedTokens(vocab_size_before=int(embedding.weight.shape[0]))
    selected: set[int] = set()
    for spec, init in specs:
        vocab = tokenizer.get_vocab()
        rows = int(text_model.get_input_embeddings().weight.shape[0])
        if is_new_token(spec):
            if spec in vocab and vocab[spec] < rows:  # e.g. a tokenizer saved with the token already
                selected.add(int(vocab[spec]))
                result.new_tokens.append({"token": spec, "id": int(vocab[spec]), "init_regex": init,
                                          "init_count": 0, "already_in_vocab": True})
                continue
            init_ids = _matching_ids(vocab, init, rows) if init is not None else []
            if init is not None and not init_ids:
                raise TrainTokensError(f"train_tokens: init regex {init!r} for new token {spec} matches no vocabulary "
                                       f"entry (vocabulary strings look like 'dog</w>', 'snail</w>')")
            weight = text_model.get_input_embeddings().weight
            row = weight[init_ids].float().mean(0) if init_ids else torch.zeros(weight.shape[1])
            tokenizer.add_tokens([spec])
            new_id = int(tokenizer.convert_tokens_to_ids(spec))
            if new_id >= rows:
                text_model.resize_token_embeddings(new_id + 1, mean_resizing=False)
            weight = text_model.get_input_embeddings().weight
            weight[new_id] = row.to(weight.dtype)
            selected.add(new_id)
            result.new_tokens.append({"token": spec, "id": new_id, "init_regex": init, "init_count": len(init_ids)})
        else:
            ids = _matching_ids(vocab, spec, rows)
            if not ids:
                raise TrainTokensError(f"train_tokens: regex {spec!r} matches no vocabulary entry (strings look like "
                                       f"'snail</w>'); write '[{spec}]' to add it as a new token")
            selected.update(ids)
            result.existing.append({"regex": spec, "ids": ids})
    result.ids = sorted(selected)
    text_model.requires_grad_(False)  # the resized table is a fresh Parameter
    if result.new_tokens:
        fix_eos_pooling(text_model, tokenizer)
    return result


def fix_eos_pooling(text_model: Any, tokenizer: Any) -> bool:
    """Make HF pool at the first EOS id instead of ``argmax(input_ids)`` (legacy ``eos_token_id == 2``
    configs); returns True if the model was changed. Identical for prompts without new tokens,
    because EOS (49407) is the largest id of the base vocabulary."""
    inner = getattr(text_model, "text_model", text_model)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or getattr(inner, "eos_token_id", None) != 2 or eos == 2:
        return False
    inner.eos_token_id = int(eos)
    text_model.config.eos_token_id = int(eos)
    return True


__all__ = ["TrainTokensError", "TrainedTokens", "add_train_tokens", "fix_eos_pooling", "is_new_token",
           "validate_train_tokens"]
