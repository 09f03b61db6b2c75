"""What the Stage B and Stage C jobs share: their config keys, the trained generator, the frozen
EfficientNet encoder, the diffusion loss and its state, and the dry-run description."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from core.config import REQUIRED, doc
from core.fused_backward import FusedBackwardConfig
from core.offload import OffloadConfig
from core.quantize import QuantConfig
from core.errors import UserError
from core.seeding import derive_seed
from core.training import TrainingConfig, TrainingCore
from gdf.weighting import LossWeighting, check_loss_weighting
from modules.common import BLOCK_TYPES
from train.diffusion_loss import DiffusionLoss, has_buckets
from train.masked_loss import MaskedLossConfig
from train.noise_options import NoiseConfig, NoiseOptions

log = logging.getLogger("cascade.train")


@dataclass
class CascadeConfig(TrainingConfig, QuantConfig, FusedBackwardConfig, OffloadConfig, NoiseConfig, MaskedLossConfig):
    """Keys shared by the Stage B and Stage C jobs (official names)."""

    config_aliases: ClassVar[dict[str, str]] = {"caption_dropout": "text_dropout"}
    #: 'did you mean' of keys from other jobs (core.config.config_hints; the LoRA job names its own)
    config_hints: ClassVar[dict[str, str]] = {
        k: "it is a key of the LoRA job (train/train_c_lora.py)" for k in ("rank", "alpha", "train_tokens", "module_filters")
    } | {"controlnet_filter": "it is a key of the ControlNet job (train/train_c_controlnet.py)"}

    model_version: str = doc(REQUIRED, "Architecture of the trained network: '3.6B' / '1B' (Stage C), '3B' / '700M' (Stage B), 'tiny' (CPU tests/demo).")
    effnet_checkpoint_path: Optional[str] = doc(None, "EfficientNetEncoder weights (.safetensors); required by Stage C and Stage B training.")
    stage_a_checkpoint_path: Optional[str] = doc(None, "Stage A weights: required by Stage B jobs (latents and previews); with stage_b_checkpoint_path, full C->B->A previews of Stage C jobs.")
    clip_text_model_name: str = doc("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "Tokenizer + CLIP text encoder (Hugging Face name or local folder).")
    adaptive_loss_weight: bool = doc(False, "Use AdaptiveLossWeight instead of P2LossWeight (accepts true/false, also as strings).")
    loss_weighting: Optional[LossWeighting] = doc(
        None, "Per-sample weight of the ε-MSE by noise level: p2 = 1/(1+SNR) (official), adaptive (= adaptive_loss_weight: "
              "true), min_snr = min(SNR, min_snr_gamma)/SNR (Min-SNR-γ: faster convergence, less weight on nearly clean "
              "steps), debiased = 1/sqrt(SNR), sech = 1/cosh(logSNR/2), constant = 1. None: the job's official choice "
              "(P2, or adaptive with adaptive_loss_weight: true); another explicit choice next to adaptive_loss_weight: "
              "true is an error.")
    min_snr_gamma: Optional[float] = doc(None, "γ of loss_weighting: min_snr (> 0; None = 5, the usual value); only with min_snr.")
    text_dropout: float = doc(0.05, "Probability of replacing a caption by the empty string during training (classifier-free guidance).")
    shift: float = doc(1.0, "Official Stage B key that the official code never reads; accepted and ignored the same way (a warning is logged when it is not 1).")
    edm_objective: bool = doc(False, "Official key of finetune_c_3b_v.yaml; the v/EDM objective is not implemented, so only false is accepted.")
    saliency_model_path: Optional[str] = doc(
        "models/saliency_model.pt", "The released saliency network (MicroResNet, `.pt` or a converted `.safetensors`; "
                                    "`bash models/download_models.sh saliency`) of `crop: smart` and of the InpaintFilter masks. "
                                    "null: no saliency network (`crop: auto` then crops at random).")

    def validate_cascade(self) -> None:
        if self.edm_objective:
            raise UserError("config key 'edm_objective: true' is not supported: the v/EDM objective is not "
                            "implemented (the official finetune_c_3b_v.yaml never ran); remove the key or set it to false")
        if self.shift != 1.0:
            log.warning("config key 'shift' = %s is ignored (as in the official code, which never reads it); "
                        "training and sampling use shift 1", self.shift)
        if self.adaptive_loss_weight and self.loss_weighting not in (None, "adaptive"):
            raise UserError(f"config keys 'adaptive_loss_weight: true' and 'loss_weighting: {self.loss_weighting}' "
                            f"conflict; keep one (loss_weighting: adaptive is the same as adaptive_loss_weight: true)")
        try:
            check_loss_weighting(self.loss_weighting, self.min_snr_gamma)
        except ValueError as exc:
            raise UserError(f"config keys 'loss_weighting' / 'min_snr_gamma': {exc}") from None
        self.check_fraction("text_dropout")
        self.validate_crop()

    def validate_crop(self) -> None:
        """Resolve ``crop: auto`` as the official code chose (SmartCrop for fixed-size training once the
        saliency file is configured) and check that ``crop: smart`` has its saliency file."""
        from train.saliency import resolve_job_crop

        resolve_job_crop(self)

    def check_versions(self, kind: str, what: str) -> None:
        """UserError unless ``model_version`` is a registered version of ``kind``."""
        from modules.registry import MODEL_CONFIGS

        versions = list(MODEL_CONFIGS[kind])
        if self.model_version not in versions:
            raise UserError(f"config key 'model_version': {what} has versions {versions}, got '{self.model_version}'")


class CascadeTrainer(TrainingCore):
    """Base of the Stage B / Stage C jobs: a generator of ``model_kind`` trained with a GDF loss."""

    #: registry kind of the trained network ("stage_c" / "stage_b")
    model_kind: str = ""
    #: registry kind of the frozen network that decodes previews ("previewer" / "stage_a")
    preview_decoder: str = ""
    #: FSDP shards each residual/attention/timestep/feed-forward block before the root
    block_types = BLOCK_TYPES

    def model_identity(self) -> dict[str, Any]:
        """The generator's registry kind and architecture: a checkpoint of another one cannot resume."""
        return {"model_kind": self.model_kind, "model_version": self.cfg.model_version}

    @classmethod
    def model_layout(cls, cfg: Any) -> dict[str, tuple[str, str]]:
        """``{name: (registry kind, model_version)}`` of the networks a dry run reports: the generator,
        the EfficientNet encoder and the preview decoder."""
        layout = {"generator": (cls.model_kind, cfg.model_version), "effnet": ("effnet", "default")}
        if cls.preview_decoder:
            layout[cls.preview_decoder] = (cls.preview_decoder, "default")
        return layout

    @classmethod
    def describe(cls, cfg: Any) -> list[str]:
        from modules.registry import build_model

        lines = ["# models"]
        for name, (kind, version) in cls.model_layout(cfg).items():
            try:
                n = sum(p.numel() for p in build_model(kind, version, device="meta").parameters())
                lines.append(f"{name}: {kind} {version}: {n:,} parameters ({human_count(n)})")
            except Exception as exc:  # noqa: BLE001 - a dry run reports, it does not fail here
                lines.append(f"{name}: {kind} {version}: size unavailable ({exc})")
        return lines

    @classmethod
    def memory_simulation(cls, cfg: Any, world_size: int = 1) -> Any:
        """``--dry-run --simulate``: one step of this run simulated at full size on the CPU
        (``core.memsim`` on ``train/bench_step.py``'s step), a ``core.memsim.SimResult``."""
        from train.bench_step import row_from_config, script_of, simulate_row

        return simulate_row(row_from_config(script_of(cls), cfg, world_size))

    # -- building blocks of build_models() ------------------------------------------------
    def make_gdf(self) -> Any:
        """The GDF of the job: the official preset named by ``model_kind`` (``gdf.presets.stage_c`` /
        ``stage_b``), with the adaptive loss weight when ``adaptive_loss_weight`` is set."""
        from gdf import presets

        return getattr(presets, self.model_kind)(adaptive_loss_weight=self.cfg.adaptive_loss_weight)

    def setup_loss(self) -> None:
        """``self.gdf`` and ``self.loss``; an adaptive loss weight is saved with every checkpoint."""
        self.gdf = self.make_gdf()
        if self.cfg.loss_weighting is not None:  # explicit choice: replaces the job's official weight
            from gdf import make_loss_weight

            self.gdf.loss_weight = make_loss_weight(self.cfg.loss_weighting, self.cfg.min_snr_gamma)
        noise = NoiseOptions(self.cfg)
        noise.apply_offset(self.gdf)
        self.loss = DiffusionLoss(self.gdf, self.defer, self.autocast, noise=noise)
        if has_buckets(self.gdf.loss_weight):
            self.register_state("loss_weight.pt", self.gdf.loss_weight)

    def load_generator(self) -> nn.Module:
        """The network to train: ``generator_checkpoint_path`` loaded strictly, or a fresh init ONLY
        when the key is null/absent (logged loudly)."""
        cfg = self.cfg
        if cfg.generator_checkpoint_path is None:
            if getattr(self, "resuming", False):  # the resumed checkpoint's weights replace the init
                log.info("building %s %s; its weights come from the checkpoint being resumed", self.model_kind,
                         cfg.model_version)
            else:
                log.warning("=" * 78)
                log.warning("generator_checkpoint_path is not set: training %s %s FROM SCRATCH (random init)",
                            self.model_kind, cfg.model_version)
                log.warning("=" * 78)
            from modules.registry import build_model

            # Seeded init: every rank (and every rerun) starts from the same weights.
            torch.manual_seed(derive_seed(cfg.seed, "init", self.model_kind))
            return build_model(self.model_kind, cfg.model_version, dtype=self.model_dtype)
        from modules.loading import load_model

        model = load_model(self.model_kind, cfg.model_version, cfg.generator_checkpoint_path,
                           dtype=self.model_dtype, device="cpu", strict=True)
        log.info("loaded %s %s from %s", self.model_kind, cfg.model_version, cfg.generator_checkpoint_path)
        return model

    def build_pipeline(self, batch_size: int, state: Optional[dict]) -> Any:
        """The image batches (uint8 from the workers, float on the training device)."""
        from core.data import build_pipeline

        cfg = self.cfg
        return build_pipeline(cfg, batch_size=batch_size, state=state, **self.image_pipeline_options())

    def image_pipeline_options(self) -> dict:
        """The ``build_pipeline`` keywords every image pipeline of this rank shares: rank, seed,
        workers, uint8 batches, and for ``crop: smart`` the saliency network (run in the workers)."""
        cfg = self.cfg
        saliency = None
        if cfg.crop == "smart":
            from train.saliency import load_job_saliency

            saliency = load_job_saliency(cfg, "cpu")  # the workers decode on the CPU
        return dict(rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg.seed,
                    num_workers=cfg.num_workers, saliency=saliency, image_dtype="uint8", masks=cfg.mask_mode())

    def pixel_weights(self, batch: dict, latents: torch.Tensor) -> Optional[torch.Tensor]:
        """Per latent pixel loss weights of a batch under ``masked_loss`` (train/masked_loss.py), else None."""
        if not self.cfg.masked_loss:
            return None
        from train.masked_loss import CACHE_MASK, MASK_KEY, pixel_weights

        masks = batch[MASK_KEY] if MASK_KEY in batch else batch[CACHE_MASK]
        return pixel_weights(masks.to(latents.device), tuple(latents.shape[-2:]), self.cfg.unmasked_weight)

    def load_effnet(self) -> nn.Module:
        """The frozen EfficientNet encoder (channels-last: ~2-3x faster convolutions, same results)."""
        from modules.loading import load_detected

        # the version the file holds: the official encoder, or the demo's small one
        effnet = load_detected("effnet", self.cfg.effnet_checkpoint_path, device=self.device)
        return effnet.to(memory_format=torch.channels_last)

    def encode_effnet(self, images: torch.Tensor) -> torch.Tensor:
        """EfficientNet latents of [0,1] images (ImageNet-normalised, frozen encoder, fp32 out)."""
        from modules.effnet import imagenet_normalize

        x = imagenet_normalize(images.float()).contiguous(memory_format=torch.channels_last)
        return self.effnet(x).float()


def human_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
