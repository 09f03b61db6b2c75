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

#: a prompt word that looks like a trained token: ``[name]`` or ``<name>`` (training.md 7.1)
TRIGGER_RE = re.compile(r"\[[^\[\]\s]+\]|<[^<>\s]+>")


def _file_tokens(meta: dict, config_tokens: Optional[list], source: str, several: bool) -> Optional[list]:
    """The ``train_tokens`` to replay for one LoRA file: the file's own (its metadata, written by
    the LoRA trainer) or, for a file without them (official layout), the config's; a config whose
    ``train_tokens`` differ from the file's is an error (the rows would land on the wrong tokens)."""
    from modules.lora_formats import metadata_list

    saved = metadata_list(meta, "train_tokens") if "train_tokens" in meta else None
    if saved is None:
        if several and config_tokens:
            raise UserError(f"{source}: the file does not record its train_tokens and several LoRA files are "
                            f"loaded, so the config's train_tokens cannot be assigned to it")
        return config_tokens
    saved = [list(t) for t in saved]
    if config_tokens and [list(t) for t in config_tokens] != saved:
        raise UserError(f"{source}: the file was trained with train_tokens {saved} but the config says "
                        f"{[list(t) for t in config_tokens]}; remove train_tokens from the config (the file's own "
                        f"are used) or fix it")
    return saved


def _check_file_facts(meta: dict, lora: Any, cfg: Any, source: str) -> None:
    """The config's ``rank`` / ``module_filters`` describe the file: checked, never ignored."""
    from modules.lora_formats import metadata_list

    ranks = sorted({e.rank for e in lora.entries})
    if cfg.rank is not None and ranks != [cfg.rank]:
        raise UserError(f"{source}: LoRA rank is {ranks} but the config says rank {cfg.rank}; fix 'rank' "
                        f"or remove it (the file's rank is used)")
    saved = metadata_list(meta, "module_filters")
    if cfg.module_filters is not None and lora.layout != "official" and saved is not None \
            and list(saved) != list(cfg.module_filters):
        raise UserError(f"{source}: the file was trained with module_filters {saved} but the config says "
                        f"{cfg.module_filters}; the file names its own targets: remove module_filters or fix it")


def load_lora_files(model: Any, tokenizer: Any, text_model: Any, cfg: Any) -> tuple[list, list[str]]:
    """Merge every LoRA of ``cfg.lora_files`` into ``model`` in order, each file's trained tokens
    replayed from its metadata (its token rows moved to the ids they get here, so several files
    that each trained a new token can be combined). Returns ``(merged LoRAs, new token strings)``."""
    from inference.lora import MergedLora, read_lora
    from modules.lora_formats import metadata_list, read_lora_file

    files = cfg.lora_files
    merged, new_tokens = [], []
    for path, strength in files:
        source = str(path)
        try:
            sd, meta = read_lora_file(source)
        except FileNotFoundError:
            raise UserError(f"LoRA file not found: {source}") from None
        tokens = _file_tokens(meta, cfg.train_tokens, source, several=len(files) > 1)
        ids = add_train_tokens(tokenizer, text_model, tokens)
        lora = read_lora(sd, model, cfg.module_filters or metadata_list(meta, "module_filters"),
                         None, source=source)
        _check_file_facts(meta, lora, cfg, source)
        if lora.token_indices is not None:
            lora.token_indices = _moved_token_rows(lora.token_indices, metadata_list(meta, "token_ids"), ids, source)
        new_tokens += [t[0] for t in tokens or [] if is_trigger(t[0])]
        lora_merged = MergedLora(model, lora, text_model, source=source)
        lora_merged.set_strength(strength)
        merged.append(lora_merged)
    return merged, new_tokens


def _moved_token_rows(indices: torch.Tensor, saved_ids: Optional[list], ids: list[int], source: str) -> torch.Tensor:
    """The file's token rows at the ids its tokens got in this tokenizer (the same ids when it is
    the only file; later ids when another file's new tokens came first)."""
    if not saved_ids or list(saved_ids) == list(ids):
        return indices
    if len(saved_ids) != len(ids):
        raise UserError(f"{source}: the file trained {len(saved_ids)} token row(s) but its train_tokens give "
                        f"{len(ids)} here; wrong clip_text_model_name?")
    table = dict(zip(saved_ids, ids))
    return torch.tensor([table.get(int(i), int(i)) for i in indices], dtype=indices.dtype)


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
