"""LoRA files at sampling time: each file read, its trained tokens replayed from its own metadata
(checked against the config and moved to the ids they get here), then merged into the model."""
from __future__ import annotations

from typing import Any, Optional

import torch

from inference.errors import UserError
from inference.lora import MergedLora, read_lora
from inference.tokens import add_train_tokens, is_trigger
from modules.lora_formats import metadata_list, read_lora_file


def _file_tokens(meta: dict, config_tokens: Optional[list], source: str, several: bool) -> Optional[list]:
    """The ``train_tokens`` to replay for one LoRA file: the file's own (its metadata, written by
    the LoRA trainer) or, for a file without them (official layout), the config's; a config whose
    ``train_tokens`` differ from the file's is an error (the rows would land on the wrong tokens)."""
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
