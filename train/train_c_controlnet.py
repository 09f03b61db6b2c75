"""ControlNet training on a frozen Stage C.

    python3 train/train_c_controlnet.py configs/training/controlnet_c_3b_canny.yaml [--dry-run]

Per step (docs/OFFICIAL.md, ControlNet training; docs/CONTROLNET.md): control = filter(images) (no grad; or the sample's
pre-computed ``control_image_key`` file); cnet = ControlNet(control) (with grad); Stage C conditions
as in train_c.py (no grad) plus ``cnet``; diffusion loss with ``offset_noise``. Only the ControlNet
trains. Deviations from the official script (on purpose):
* Stage C is frozen AND in eval mode (the official code left it in train mode, so its 0.1 dropout
  was active during ControlNet training and previews, and it computed full Stage C gradients);
* the effnet backbone of a NEW ControlNet starts from the Stage C EfficientNet encoder's backbone
  (``effnet_checkpoint_path``) instead of downloading ImageNet weights (nothing downloads here);
* filters get their randomness from a generator seeded per (seed, rank, update, micro-step).
The ControlNet's projection width follows the chosen Stage C (``c_hidden[0]``), so 1B works.
Saved: ``controlnet.safetensors`` in the official layout (+ ``controlnet_ema`` with EMA keys).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

import torch
from torch import nn

from core.config import REQUIRED, doc
from core.errors import UserError, run_cli
from core.seeding import derive_seed
from train.memory_specs import controlnet_spec
from train.train_c import StageCConfig, StageCTrainer

log = logging.getLogger("cascade.train.controlnet")


@dataclass
class ControlNetConfig(StageCConfig):
    """Keys of a Stage C ControlNet job (official keys + control_image_key; docs/CONTROLNET.md)."""

    controlnet_blocks: list[int] = doc(REQUIRED, "Stage C ResBlock call indices that receive a control projection, "
                                                 "e.g. [0, 4, 8, 12, 51, 55, 59, 63] (3.6B has 64 calls: 0..63).")
    controlnet_filter: str = doc(REQUIRED, "Filter turning images into the control input: CannyFilter, InpaintFilter, "
                                           "SREffnetFilter, SRFilter, IdentityFilter, or 'package.module:ClassName'.")
    controlnet_filter_params: Optional[dict] = doc(None, "Keyword arguments of the filter (e.g. {resize: 224}).")
    controlnet_bottleneck_mode: Optional[str] = doc(None, "ControlNet backbone: effnet (default), simple or large.")
    controlnet_checkpoint_path: Optional[str] = doc(None, "ControlNet weights to start from (official layout).")
    control_image_key: Optional[str] = doc(None, "Read pre-computed control images from this sample file (e.g. "
                                                 "'control.png') instead of running the filter; needs crop: center. "
                                                 "The filter still fixes the channel count (1 = grey, 3 = RGB).")

    def validate_controlnet(self) -> None:
        from modules.controlnet import BOTTLENECK_MODES

        if self.regularization_webdataset_path is not None:  # class images have no control images
            raise UserError("config key 'regularization_webdataset_path' is not supported by ControlNet training "
                            "(regularization images are for finetune and LoRA jobs); remove it")

        blocks = self.controlnet_blocks
        if not self.validate_only or isinstance(blocks, list):
            if not isinstance(blocks, list) or not blocks or len(set(blocks)) != len(blocks) or \
                    any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
                raise UserError(f"config key 'controlnet_blocks' must be a list of distinct ResBlock indices >= 0, got {blocks!r}")
        if self.controlnet_bottleneck_mode not in (None, *BOTTLENECK_MODES):
            raise UserError(f"config key 'controlnet_bottleneck_mode' must be one of {list(BOTTLENECK_MODES)} or null, "
                            f"got {self.controlnet_bottleneck_mode!r}")
        self.check_file("controlnet_checkpoint_path")
        if self.cache_path:
            raise UserError("config key 'cache_path' is not supported for ControlNet training: the control input is "
                            "computed from the images every step (controlnet_filter); remove cache_path")
        if isinstance(self.controlnet_filter, str):  # catch a filter-name or parameter typo at start-up
            from modules import filters

            try:
                built = filters.resolve_filter(self.controlnet_filter, dict(self.controlnet_filter_params or {}))
            except (filters.FilterError, ImportError) as exc:
                raise UserError(f"config key 'controlnet_filter' / 'controlnet_filter_params': {exc}") from None
            if getattr(built, "needs_saliency_model", False) and self.control_image_key is None:
                from train.saliency import check_saliency_file

                check_saliency_file(self, f"{self.controlnet_filter} (its masks)")
        if self.control_image_key is not None and self.crop != "center":
            raise UserError("config key 'control_image_key' needs 'crop: center' (the control image must be cropped "
                            "exactly like the image; random crops are not shared with extra sample files yet)")


class StageCControlNetTrainer(StageCTrainer):
    """Trains a ControlNet that steers a frozen Stage C."""

    Config = ControlNetConfig
    description = "Train a ControlNet for a frozen Stage C."

    @classmethod
    def describe(cls, cfg: Any) -> list[str]:
        from modules import filters
        from modules.controlnet import ControlNet
        from modules.registry import build_model

        c_in = filters.resolve_filter(cfg.controlnet_filter, dict(cfg.controlnet_filter_params or {})).num_channels()
        c_proj = controlnet_c_proj(build_model("stage_c", cfg.model_version, device="meta"))
        with torch.device("meta"):
            net = ControlNet(c_in=c_in, c_proj=c_proj, proj_blocks=list(cfg.controlnet_blocks),
                             bottleneck_mode=cfg.controlnet_bottleneck_mode)
        n = sum(p.numel() for p in net.parameters())
        return super().describe(cfg) + [
            "# ControlNet", f"{cfg.controlnet_filter} (c_in {c_in}), {net.bottleneck_mode} backbone, c_proj {c_proj}, "
                            f"blocks {list(cfg.controlnet_blocks)}: {n:,} parameters"]

    memory_spec = staticmethod(controlnet_spec)  # the dry run's per-rank memory estimate

    # -- models -------------------------------------------------------------------------------
    def make_gdf(self) -> Any:
        from gdf import presets

        # offset_noise: set on the GDF by setup_loss (train/noise_options.py), as for every job
        if self.cfg.adaptive_loss_weight:
            return presets.stage_c(adaptive_loss_weight=True)
        return presets.controlnet()

    def build_generator(self) -> None:
        """Stage C is frozen (eval, no grad, frozen dtype); the ControlNet's gradients still flow
        back through its activations, so gradient checkpointing applies to it too."""
        # shard=True: under use_fsdp each rank holds 1/world of the frozen Stage C (3.6B in bf16 is 7 GB).
        generator = self.add_frozen("generator", self.load_generator(), shard=True, quantize=True)
        if self.cfg.gradient_checkpointing:
            generator.set_gradient_checkpointing(self.cfg.gradient_checkpointing)  # True or a block period N

    def build_models(self) -> None:
        from modules.controlnet import ControlNet
        from fileio.state_dicts import read_state_dict
        from modules.loading import load_state_dict_strict

        super().build_models()
        cfg = self.cfg
        self.cnet_filter = self.build_filter()
        c_in = int(self.cnet_filter.num_channels())
        if cfg.control_image_key is not None and c_in not in (1, 3):
            raise UserError(f"control_image_key: pre-computed control images give 1 (grey) or 3 (RGB) channels, but "
                            f"{cfg.controlnet_filter} needs {c_in}; remove control_image_key for this filter")
        self.control_reader = None
        if cfg.control_image_key is not None:
            from train.control_images import ControlImageReader

            self.control_reader = ControlImageReader(cfg.control_image_key)
        try:
            with torch.random.fork_rng(devices=[]):  # the init repeats for a seed, whatever ran before
                torch.manual_seed(derive_seed(cfg.seed, "controlnet-init"))
                controlnet = ControlNet(c_in=c_in, c_proj=controlnet_c_proj(self.generator),
                                        proj_blocks=list(cfg.controlnet_blocks),
                                        bottleneck_mode=cfg.controlnet_bottleneck_mode)
        except ValueError as exc:
            raise UserError(f"ControlNet: {exc}") from None
        self.check_blocks()
        if cfg.controlnet_checkpoint_path:
            load_state_dict_strict(controlnet, read_state_dict(cfg.controlnet_checkpoint_path),
                                   cfg.controlnet_checkpoint_path)
            log.info("loaded ControlNet weights from %s", cfg.controlnet_checkpoint_path)
        elif controlnet.bottleneck_mode == "effnet":
            init_backbone_from_effnet(controlnet, self.effnet)
        self.add_trained("controlnet", controlnet, save_as="controlnet")
        self._preview_control: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def build_filter(self) -> Any:
        from modules import filters

        cfg = self.cfg
        params = dict(cfg.controlnet_filter_params or {})
        cls = filters.FILTERS.get(cfg.controlnet_filter)
        accepted = inspect.signature(cls).parameters if cls is not None else {}
        if "device" in accepted:
            params.setdefault("device", self.device)
        if "effnet" in accepted:  # SREffnetFilter encodes with the loaded (frozen) Stage C encoder
            params.setdefault("effnet", self.effnet)
        try:
            built = filters.resolve_filter(cfg.controlnet_filter, params)
        except (filters.FilterError, ImportError, OSError) as exc:
            raise UserError(f"controlnet_filter {cfg.controlnet_filter}: {exc}") from None
        if getattr(built, "needs_saliency_model", False) and cfg.control_image_key is None:
            from train.saliency import load_job_saliency

            # the released saliency network of saliency_model_path (InpaintFilter masks)
            built.set_saliency_model(load_job_saliency(cfg, self.device))
        return built

    def check_blocks(self) -> None:
        """Every configured block index must be a ResBlock call of this Stage C (else it is silently unused)."""
        from modules.common import ResBlock
        from modules.registry import MODEL_CONFIGS

        repeats = MODEL_CONFIGS["stage_c"][self.cfg.model_version].get("block_repeat", ((1, 1), (1, 1)))
        if any(r != 1 for level in repeats for r in level):
            return  # repeated up blocks: counting calls needs a forward; the Stage C versions have none
        calls = sum(isinstance(m, ResBlock) for m in self.generator.modules())
        bad = [b for b in self.cfg.controlnet_blocks if b >= calls]
        if bad:
            raise UserError(f"config key 'controlnet_blocks': {bad} exceed the {calls} ResBlock calls of Stage C "
                            f"{self.cfg.model_version} (valid: 0..{calls - 1})")

    # -- step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def control_input(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ControlNet input, preview (B,3,H,W))`` of a batch: the filter, or the stored images."""
        images = batch["images"].to(self.device)
        if self.control_reader is not None:
            control = self.control_reader.load(list(batch["urls"]), list(batch["keys"]), tuple(images.shape[-2:]))
            control = control.to(self.device)
            if self.cnet_filter.num_channels() == 1:
                control = control.mean(1, keepdim=True)
            return control, control.expand(-1, 3, -1, -1)
        from modules.filters import FilterError

        try:
            out = self.cnet_filter(images, generator=generator)
        except (ImportError, FilterError) as exc:  # e.g. the face model of IdentityFilter is not installed
            raise UserError(f"controlnet_filter {self.cfg.controlnet_filter}: {exc}") from None
        control, preview = out if isinstance(out, tuple) else (out, out)
        return control, preview

    def extra_model_inputs(self, batch: dict, conditions: dict) -> dict[str, Any]:
        step, micro = self.micro_step
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "filter", self.dist.rank, step, micro))
        control, preview = self.control_input(batch, g)
        if self._preview_control is None:  # the preview grid reuses the first batch's control inputs
            k = min(self.cfg.num_preview_images, len(control))
            self._preview_control = (control[:k].detach().clone(), preview[:k].detach().float().cpu().clone())
        param = next(self.unwrapped("controlnet").parameters())
        with self.autocast():
            cnet = self.controlnet(control.to(param.device, param.dtype))
        return {"cnet": cnet}

    def validation_forward(self, model: nn.Module, sample: dict, conditions: dict,
                           generator: torch.Generator) -> Any:
        """``model`` is the ControlNet (or its EMA): its control input from the sample's own
        generator (random filters such as inpaint masks), the frozen Stage C predicts."""
        from train.diffusion_loss import repeat_inputs

        control, _ = self.control_input(sample, generator)
        param = next(model.parameters())
        with self.autocast():
            cnet = model(control.to(param.device, param.dtype))
        return lambda x, r: self.generator(x, r, **repeat_inputs({**conditions, "cnet": cnet}, len(x)))

    # -- previews -----------------------------------------------------------------------------
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        if self._preview_control is None:
            return {}
        control, control_preview = self._preview_control
        n = len(control)
        images = batch["images"][:n]
        captions = list(batch["captions"][:n])
        self.preview_prompt_list = captions  # what the CLIP score compares the samples with
        cond = self.get_conditions({"captions": captions}, is_eval=True)
        uncond = self.get_conditions({"captions": captions}, is_eval=True, is_unconditional=True)
        h, w = images.shape[-2:]
        shape = (n, 16, max(1, h // 32), max(1, w // 32))
        grids = {"control": control_preview.clamp(0, 1), "images": images.float()}
        for name, net in self.preview_models().items():
            param = next(net.parameters())
            with self.autocast():
                cnet = net(control.to(param.device, param.dtype))
            # The same control list for both CFG halves (docs/OFFICIAL.md, ControlNet training).
            latents = self.sample_latents(self.generator, {**cond, "cnet": cnet}, {**uncond, "cnet": cnet}, shape)
            grids[name] = self.previewer(latents).float().clamp(0, 1)
        return grids


def controlnet_c_proj(generator: nn.Module) -> int:
    """The ControlNet projection width: Stage C's ``c_hidden[0]`` (2048 for 3.6B, 1536 for 1B)."""
    return int(generator.embedding[1].weight.shape[0])


@torch.no_grad()
def init_backbone_from_effnet(controlnet: nn.Module, effnet: nn.Module) -> None:
    """Start an effnet-backbone ControlNet from the Stage C EfficientNet encoder's backbone (the same
    efficientnet_v2_s features) instead of ImageNet weights (not downloadable here). A replaced stem
    (c_in != 3) copies input channels as upstream does: RGB into channels 0-2 and zeros beyond, or the
    first c_in channels."""
    src = effnet.backbone.state_dict()
    for k, v in controlnet.backbone.state_dict().items():
        if v.shape == src[k].shape:
            v.copy_(src[k])
        elif v.shape[1] > 3:
            v.zero_()
            v[:, :3] = src[k]
        else:
            v.copy_(src[k][:, :v.shape[1]])


def main() -> NoReturn:
    """The command line (console script ``cascade-train-c-controlnet``): ``error: ...`` and exit 2 on a user error."""
    run_cli(StageCControlNetTrainer.main)


if __name__ == "__main__":
    main()
