"""LoRA (+ token) training on a frozen Stage C.

    python3 train/train_c_lora.py configs/training/finetune_c_3b_lora.yaml [--set rank=8] [--dry-run]

What differs from ``train_c.py`` (docs/OFFICIAL.md, LoRA tokens; docs/LORA.md):
* the Stage C generator is FROZEN (``requires_grad_(False)``; the official script forgot this and
  paid for full 3.6B gradients); ``apply_lora(generator, module_filters, rank, alpha, lora_type)`` adds
  the only trainable generator parameters (kept in float32 on a bf16 base), adapters of the kind
  ``lora_type`` (``modules.adapters``: lora, dora, lokr, loha; the job never names a kind);
  ``lora_plus_ratio`` trains each kind's up/B factors with a larger learning rate (LoRA+);
* ``train_tokens`` adds/selects CLIP tokens whose embedding rows train through a ReToken; the text
  encoder then runs WITH grad (only those rows change);
* ``generator_dropout`` defaults to 0: the official run trained in eval mode after its first preview;
* outputs per save point (run folder, also in ``state/step_*/``): ``lora.safetensors`` (named keys +
  metadata), ``tokens.json``, ``lora_official.safetensors`` (positional layout of the official code)
  and optionally ``lora_comfyui.safetensors`` (+ ``lora_comfyui_embeddings.safetensors``);
* DDP and FSDP work: the LoRA lives in the wrapped generator (under ``use_fsdp`` FSDP2 shards the
  frozen base and the LoRA with each block; the files gather the LoRA shards on every rank); the
  token rows are registered unwrapped inside the unsharded text model, so the core averages their
  gradients over ranks.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

import torch
from torch import nn

from core.config import doc
from core.errors import UserError, run_cli
from core.quantize import quantize_as_configured
from core.seeding import derive_seed
from modules.adapters import kind, kinds
from modules.lora import apply_lora
from train.memory_specs import lora_parameter_count, lora_spec
from train.train_c import StageCConfig, StageCTrainer

log = logging.getLogger("cascade.train.lora")

LORA_FILE = "lora.safetensors"
TOKENS_FILE = "tokens.json"
OFFICIAL_FILE = "lora_official.safetensors"
COMFY_FILE = "lora_comfyui.safetensors"
COMFY_EMBEDDINGS_FILE = "lora_comfyui_embeddings.safetensors"


@dataclass
class LoraConfig(StageCConfig):
    """Keys of a Stage C LoRA job (official keys + alpha and output switches; docs/LORA.md)."""

    module_filters: list[str] = doc([".attn"], "Substrings of module names that get a LoRA (plain substring match, "
                                               "as the official code); ['.attn'] = every attention's in_proj and out_proj.")
    rank: int = doc(4, "LoRA rank r.")
    alpha: float = doc(1.0, "LoRA update = lora_up @ lora_down * alpha / rank; 1.0 = the official scale 1/rank.")
    lora_type: str = doc("lora", "Adapter kind: 'lora'; 'dora' (weight-decomposed LoRA: also a magnitude per output "
                                 "row, W' = m * (W + update) / ||W + update||_row, closer to full finetuning at the "
                                 "same rank; ComfyUI loads its export); 'lokr' (LyCORIS LoKr: kron(w1, w2_a @ w2_b), "
                                 "see lokr_factor); 'loha' (LyCORIS LoHa: Hadamard product of two rank-r products). "
                                 "All kinds train on every target module_filters selects; docs/LORA.md.")
    lokr_factor: int = doc(-1, "LoKr only: the Kronecker factor size (LyCORIS 'factor'); -1 = as square as possible.")
    lora_plus_ratio: float = doc(1.0, "LoRA+: the up/B factors of every adapter (lora_up; LoKr w1/w2_a; LoHa "
                                      "w1_a/w2_a) train with lr * this ratio (LoRA+ paper: e.g. 16); 1 = one lr.")
    train_tokens: Optional[list[list[Optional[str]]]] = doc(
        None, "[[token_or_regex, init_regex_or_null], ...]: '[name]' adds a token initialised to the mean of the "
              "rows matching init_regex; a bare regex finetunes the matching existing tokens.")
    lora_checkpoint_path: Optional[str] = doc(None, "LoRA to start from (named, official positional, ComfyUI or kohya layout).")
    save_official_layout: Optional[bool] = doc(None, "Also write lora_official.safetensors (official positional "
                                                     "layout); default: yes for lora_type lora (that layout cannot "
                                                     "hold a DoRA).")
    export_comfyui: bool = doc(False, "Also write lora_comfyui.safetensors (+ token embeddings) at every save.")
    generator_dropout: Optional[float] = doc(0.0, "Dropout of the frozen generator while the LoRA trains (0: no "
                                                  "dropout, as the official run after its first preview).")

    def validate_lora(self) -> None:
        from modules.lora_tokens import validate_train_tokens

        if self.rank < 1:
            raise UserError(f"config key 'rank' must be >= 1, got {self.rank}")
        if self.lora_type not in kinds():
            raise UserError(f"config key 'lora_type' must be one of {', '.join(kinds())}, got {self.lora_type!r}")
        if self.save_official_layout and not self.official_layout_holds_kind():
            raise UserError(f"config key 'save_official_layout': the official positional layout holds plain LoRAs "
                            f"only (no DoRA magnitude), so it cannot be written for lora_type: {self.lora_type}; "
                            f"remove the key (or set it to false)")
        if not self.lora_plus_ratio > 0:
            raise UserError(f"config key 'lora_plus_ratio' must be > 0, got {self.lora_plus_ratio}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise UserError(f"config key 'lokr_factor' must be -1 or >= 1, got {self.lokr_factor}")
        if not self.alpha > 0:
            raise UserError(f"config key 'alpha' must be > 0, got {self.alpha}")
        if not self.module_filters or not all(isinstance(f, str) and f for f in self.module_filters):
            raise UserError("config key 'module_filters' must be a non-empty list of module-name substrings, e.g. ['.attn']")
        validate_train_tokens(self.train_tokens)
        if self.cache_path and self.train_tokens:
            raise UserError("config key 'cache_path' cannot be used with 'train_tokens': trained tokens change the CLIP "
                            "text embeddings every step, so the text encoder must run; remove one of the two keys")
        self.check_file("lora_checkpoint_path")
        if self.ema_start_iters is not None:
            raise UserError("config key 'ema_start_iters': EMA is not supported for LoRA jobs (the official LoRA "
                            "training has none); remove the ema_* keys")

    def official_layout_holds_kind(self) -> bool:
        """Whether ``lora_official.safetensors`` can hold this run's adapter kind."""
        return "official" in kind(self.lora_type).file_names


class StageCLoraTrainer(StageCTrainer):
    """Stage C LoRA job: frozen generator + LoRA (+ trained token rows)."""

    Config = LoraConfig
    description = "Train a LoRA (and optionally new/existing tokens) on a frozen Stage C."

    @classmethod
    def describe(cls, cfg: Any) -> list[str]:
        from modules.lora_formats import stage_c_targets

        targets, shapes = stage_c_targets(cfg.model_version, list(cfg.module_filters))
        n = lora_parameter_count({t: shapes[t] for t in targets}, cfg.rank, cfg.lora_type,
                                 **kind(cfg.lora_type).options_from(cfg))
        return super().describe(cfg) + [
            "# LoRA", f"filters {list(cfg.module_filters)}: {len(targets)} adapted weights, rank {cfg.rank}, "
                      f"{n:,} {kind(cfg.lora_type).title} parameters; train_tokens: {cfg.train_tokens or []}"]

    memory_spec = staticmethod(lora_spec)  # the dry run's per-rank memory estimate

    # -- models -------------------------------------------------------------------------------
    def build_models(self) -> None:
        cfg = self.cfg
        super().build_models()
        self.build_tokens()
        self.register_files()
        if cfg.lora_checkpoint_path:
            self.load_lora_file(cfg.lora_checkpoint_path)

    def build_generator(self) -> None:
        """The frozen generator (frozen dtype: bf16 on GPU halves its memory) carrying the LoRAs,
        the only parameters of it that train (float32 even on a bf16 base)."""
        cfg = self.cfg
        generator = self.load_generator().requires_grad_(False).to(self.frozen_dtype)
        quantize_as_configured(generator, cfg)  # base_dtype: before the adapters attach (they wrap quantised weights)
        # lora_up ~ N(0, 1) comes from the global RNG: seed it so runs and ranks agree.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
            try:
                self.loras = apply_lora(generator, list(cfg.module_filters), rank=cfg.rank, alpha=cfg.alpha,
                                        lora_type=cfg.lora_type, **kind(cfg.lora_type).options_from(cfg))
            except ValueError as exc:
                raise UserError(f"config key 'module_filters': {exc}") from None
        params = []
        for _, lora in self.loras:
            params += list(lora.float().parameters())
        log.info("%s: %d adapted weights (filters %s, rank %d, alpha %g), %d trainable parameters",
                 kind(cfg.lora_type).title, len(self.loras), list(cfg.module_filters), cfg.rank,
                 cfg.alpha, sum(p.numel() for p in params))
        self.add_trained("generator", generator, params=params)

    def build_tokens(self) -> None:
        """``train_tokens``: new/selected CLIP token rows train through a ReToken in the frozen text model."""
        from modules.lora import apply_retoken
        from modules.lora_tokens import TrainedTokens, add_train_tokens

        if self.cfg.cache_path:  # no text model in a cached run (train_tokens is refused by the config)
            self.tokens = TrainedTokens()
        else:
            self.tokens = add_train_tokens(self.tokenizer, self.text_model, self.cfg.train_tokens)
        self.retoken = None
        if self.tokens.ids:
            retoken = apply_retoken(self.text_model.get_input_embeddings(), self.tokens.ids).float()
            self.add_trained("retoken", retoken, params=[retoken.embeddings], wrap=False)
            log.info("training %d token row(s): %s", len(self.tokens.ids), self.tokens.token_strings(self.tokenizer))

    def register_files(self) -> None:
        """The LoRA files of every save point (run folder + state folder); only the named file is read back."""
        from core.state import FileState

        meta = self.lora_metadata
        self.register_state(LORA_FILE, FileState(self.lora_state_dict, meta, lambda p: self.load_lora_file(p, exact=True)),
                            publish=True, required=True)
        if self.tokens.ids:
            tokens = FileState(lambda: self.tokens.to_json(self.tokenizer) | {"train_tokens": self.cfg.train_tokens})
            self.register_state(TOKENS_FILE, tokens, publish=True, restore=False)
        if self.cfg.save_official_layout is not False and self.cfg.official_layout_holds_kind():
            self.register_state(OFFICIAL_FILE, FileState(self.official_state_dict, meta), publish=True, restore=False)
        if self.cfg.export_comfyui:
            self.register_state(COMFY_FILE, FileState(self.comfyui_lora, meta), publish=True, restore=False)
            if self.retoken is not None:
                # Metadata callables run on the main rank only, so they never gather (the embeddings
                # file reads the unsharded text model).
                embeddings = FileState(lambda: self.comfyui_embeddings()[0], lambda: self.comfyui_embeddings()[1])
                self.register_state(COMFY_EMBEDDINGS_FILE, embeddings, publish=True, restore=False)

    # -- step ---------------------------------------------------------------------------------
    def part_loss(self, batch: dict, generators: list[torch.Generator],
                  sample_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.retoken is None:
            return super().part_loss(batch, generators, sample_weight)
        # Tokens train through CLIP: the conditions are computed WITH grad (docs/OFFICIAL.md, LoRA tokens).
        images = batch["images"].to(self.device)
        conditions = self.get_conditions(batch, generators=generators)
        with torch.no_grad():
            latents = self.encode_latents(images)
        return self.loss(lambda x, r: self.generator(x, r, **conditions), latents, generators,
                         sample_weight=sample_weight, pixel_weight=self.pixel_weights(batch, latents))

    # -- files --------------------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from modules.lora_formats import named_state_dict

        idx = deltas = None
        if self.retoken is not None:
            idx, deltas = self.retoken.indices, self.retoken.embeddings
        return named_state_dict(self.full_loras(), self.cfg.alpha, idx, deltas)

    def full_loras(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """``[(target, {tensor name: whole tensor})]``: under FSDP the adapter parameters are
        shards (DTensors) of the generator's blocks, gathered here. Collective then: every rank
        calls it, at each save (the core's snapshot runs on every rank)."""
        from core.distributed import full_tensor

        return [(target, {name: full_tensor(t.detach()) for name, t in adapter.tensors().items()})
                for target, adapter in self.loras]

    def optimizer_param_groups(self, params: list) -> list:
        """LoRA+: the adapters' up/B factors in a second group with ``lr * lora_plus_ratio``."""
        ratio = float(self.cfg.lora_plus_ratio)
        if ratio == 1.0:
            return params
        up = {id(p) for _, adapter in self.loras for p in adapter.up_parameters()}
        groups = [{"params": [p for p in params if id(p) not in up]},
                  {"params": [p for p in params if id(p) in up], "lr": self.cfg.lr * ratio}]
        return [g for g in groups if g["params"]]

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        from modules.lora_formats import official_state_dict

        return official_state_dict(self.lora_state_dict(), [t for t, _ in self.loras])

    def lora_metadata(self) -> dict[str, str]:
        from modules.lora_formats import FORMAT_NAME, FORMAT_VERSION

        cfg = self.cfg
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "stage": "c",
                "model_version": str(cfg.model_version), "rank": str(cfg.rank), "alpha": repr(float(cfg.alpha)),
                "lora_type": str(cfg.lora_type),
                "adapter_options": json.dumps(kind(cfg.lora_type).options_from(cfg)),
                "module_filters": json.dumps(list(cfg.module_filters)),
                "train_tokens": json.dumps(cfg.train_tokens or []),
                "tokens": json.dumps(self.tokens.token_strings(self.tokenizer) if self.tokens.ids else []),
                "token_ids": json.dumps(self.tokens.ids), "step": str(self.step),
                "targets": str(len(self.loras)), "clip_text_model_name": str(cfg.clip_text_model_name)}

    def comfyui_files(self) -> tuple[dict, Optional[tuple[dict, dict]]]:
        """``(ComfyUI LoRA state dict, (token embeddings, their metadata) or None)``."""
        return self.comfyui_lora(), self.comfyui_embeddings() if self.retoken is not None else None

    def comfyui_lora(self) -> dict[str, torch.Tensor]:
        """The LoRA in the ComfyUI layout (collective under FSDP, like :meth:`lora_state_dict`)."""
        from modules.lora_formats import entries_from_named, export_comfyui

        generator = self.unwrapped("generator")
        shapes = {t: _base_shape(generator, t) for t, _ in self.loras}
        base = None
        if kind(self.cfg.lora_type).needs_base:  # e.g. a DoRA's dora_scale, from the frozen base weights
            from core.distributed import full_tensor

            base = {t: full_tensor(_base_weight(generator, t).detach()) for t, _ in self.loras}
        return export_comfyui(entries_from_named(self.lora_state_dict()), shapes, base_weights=base)

    def comfyui_embeddings(self) -> tuple[dict, dict]:
        """The trained tokens' whole embedding rows as a ComfyUI embedding file (+ metadata)."""
        from modules.lora_formats import token_embedding_file

        with torch.no_grad():
            vectors = self.text_model.get_input_embeddings().weight[self.retoken.indices].float()
        return token_embedding_file(vectors, self.tokens.token_strings(self.tokenizer))

    @torch.no_grad()
    def load_lora_file(self, path: str, exact: bool = False) -> None:
        """Load a LoRA file of any layout into this run's LoRAs (and token rows)."""
        from modules.lora_formats import load_into_loras, read_entries, read_tokens, stage_c_targets
        from fileio.state_dicts import read_state_dict

        cfg = self.cfg
        sd = read_state_dict(path)
        _targets, shapes = stage_c_targets(cfg.model_version, list(cfg.module_filters))
        entries = read_entries(sd, shapes, official_targets=[t for t, _ in self.loras], source=path)
        load_into_loras(self.loras, entries, cfg.alpha, source=path)
        tokens = read_tokens(sd)
        if tokens is None:
            if exact and self.retoken is not None:
                raise UserError(f"{path}: has no token embeddings but train_tokens is set; resume with the same config")
            return
        indices, deltas = tokens
        if self.retoken is None:
            if indices.numel():
                log.warning("%s holds trained token embeddings (ids %s) but train_tokens is not set: ignored",
                            path, indices.tolist())
            return
        ours = self.retoken.indices.cpu()
        if not torch.equal(torch.sort(indices).values, ours):
            raise UserError(f"{path}: trained token ids {indices.tolist()} differ from this run's {ours.tolist()}; "
                            f"set train_tokens as in the run that wrote the file")
        order = torch.argsort(indices)  # files from the official code may hold the ids in any order
        self.retoken.embeddings.copy_(deltas[order].to(self.retoken.embeddings.dtype))


def _base_weight(model: nn.Module, target: str) -> torch.Tensor:
    """The frozen weight behind the LoRA on ``target`` (e.g. ``...attn.in_proj_weight``)."""
    owner, attr = target.rsplit(".", 1)
    return model.get_submodule(owner).parametrizations[attr].original


def _base_shape(model: nn.Module, target: str) -> tuple[int, ...]:
    """Shape of the frozen weight behind the LoRA on ``target``."""
    return tuple(_base_weight(model, target).shape)


def main() -> NoReturn:
    """The command line (console script ``cascade-train-c-lora``): ``error: ...`` and exit 2 on a user error."""
    run_cli(StageCLoraTrainer.main)


if __name__ == "__main__":
    main()
