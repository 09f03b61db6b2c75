"""``CascadePipeline``: prompts -> Stage C -> Stage B -> Stage A -> images (docs/OFFICIAL.md, Inference recipes).

Also image variation, image-to-image, reconstruction (effnet -> Stage B -> Stage A), LoRA and
ControlNet from the config. The sampling itself is :mod:`inference.sampling`, which the training
previews share, so a preview and this pipeline agree for the same seed.
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from inference import sampling
from inference.config import InferenceConfig, load_inference_config
from inference.errors import UserError
from inference.images import ImageLike, resize_cover_crop, to_batch, to_pil
from inference.models import (Placement, load_aux, load_clip, load_clip_image, load_controlnet,
                              load_generator, pick_device, quantize_base, weights_dtype)
from inference.sampling import SamplingSettings

ConfigSource = Union[str, Mapping[str, Any], InferenceConfig]
Seed = Union[int, torch.Generator]


def _generator(seed: Seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else sampling.make_generator(seed)


def _prompt_list(prompts: Union[str, Sequence[str]], num_images: int) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or num_images < 1:
        raise UserError("give at least one prompt and num_images >= 1")
    return [p for p in prompts for _ in range(num_images)]


def _check_size(height: int, width: int) -> None:
    # Stage B works on H/4 x W/4 latents with 2x2 patches: odd latent sides cannot be patched.
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 32 or value % 8:
            raise UserError(f"{name} must be a multiple of 8 and >= 32, got {value}")


def _repeat_to(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.size(0) == batch:
        return x
    if x.size(0) != 1:
        raise UserError(f"got {x.size(0)} input images for a batch of {batch}; give one image or "
                        f"one per generated image")
    return x.repeat(batch, *([1] * (x.dim() - 1)))


def no_control_image_message(filter_name: Optional[str]) -> str:
    """The error for a ControlNet config sampled without a control image."""
    return (f"the config loads a ControlNet (controlnet_filter {filter_name}) but no control image was "
            f"given; pass --control-image IMAGE (control_image= in Python), or use a config without the "
            f"controlnet_* keys to sample without control")


class CascadePipeline:
    """The Stable Cascade inference pipeline built from the official inference configs.

    ``stage_c`` (a Stage C config) enables text-to-image and previews; ``stage_b`` (a Stage B
    config) enables decoding to full-resolution images and reconstruction. Either may be None.
    """

    def __init__(self, stage_c: Optional[InferenceConfig] = None,
                 stage_b: Optional[InferenceConfig] = None, device: Any = None,
                 offload: Optional[bool] = None, progress: bool = True) -> None:
        if stage_c is None and stage_b is None:
            raise UserError("give a Stage C config, a Stage B config, or both")
        for cfg, stage in ((stage_c, "c"), (stage_b, "b")):
            if cfg is not None and cfg.stage != stage:
                raise UserError(f"expected a Stage {stage.upper()} config, got model_version "
                                f"{cfg.model_version!r} (Stage {cfg.stage.upper()})")
        self.cfg_c, self.cfg_b = stage_c, stage_b
        self.device = pick_device(device)
        if offload is None:
            offload = any(c is not None and c.offload for c in (stage_c, stage_b))
        self.placement = Placement(self.device, offload)
        self.progress = progress
        self.dtype = weights_dtype(stage_c or stage_b, self.device)
        home = self.placement.home
        main = stage_c or stage_b
        self._check_files()  # fail on a missing checkpoint before spending minutes loading CLIP
        self.tokenizer, self.text_model = load_clip(main.clip_text_model_name, self.dtype, home)
        quantize_base(main, self.text_model)
        self.stage_c = load_generator(stage_c, self.dtype, home) if stage_c else None
        self.stage_b = load_generator(stage_b, weights_dtype(stage_b, self.device), home) \
            if stage_b else None
        self.stage_a = load_aux("stage_a", stage_b, "stage_a_checkpoint_path", home) \
            if stage_b else None
        #: every merged LoRA (``lora``: the first) and the new tokens they trained
        self.loras, self.lora_tokens = self._load_lora() if stage_c is not None and stage_c.uses_lora else ([], [])
        self.lora = self.loras[0] if self.loras else None
        self.controlnet, self.cnet_filter = (None, None)
        if stage_c is not None and stage_c.uses_controlnet:
            self._load_controlnet()

    def _check_files(self) -> None:
        from inference.models import require_file

        if self.cfg_c is not None:
            require_file(self.cfg_c, "generator_checkpoint_path", "the Stage C generator")
            if self.cfg_c.lora_checkpoint_path:
                require_file(self.cfg_c, "lora_checkpoint_path", "the LoRA")
            for path, _ in self.cfg_c.lora_files:
                if not os.path.isfile(path):
                    raise UserError(f"LoRA file not found: {path} (--lora / config key 'loras')")
            if self.cfg_c.uses_controlnet:
                require_file(self.cfg_c, "controlnet_checkpoint_path", "the ControlNet")
        if self.cfg_b is not None:
            require_file(self.cfg_b, "generator_checkpoint_path", "the Stage B generator")
            require_file(self.cfg_b, "stage_a_checkpoint_path", "Stage A decoding")

    @classmethod
    def from_config(cls, config: Optional[ConfigSource], stage_b_config: Optional[ConfigSource] = None,
                    *, device: Any = None, overrides: Sequence[str] = (),
                    stage_b_overrides: Sequence[str] = (), root: Optional[str] = None,
                    offload: Optional[bool] = None, progress: bool = True) -> "CascadePipeline":
        """Build from config files/dicts. ``config`` may be a Stage B config alone (reconstruction).

        ``overrides``/``stage_b_overrides`` are ``key=value`` strings; ``root`` is the folder
        relative checkpoint paths (and local CLIP folders) are resolved against.
        """
        first = load_inference_config(config, overrides, root) if config is not None else None
        second = (load_inference_config(stage_b_config, stage_b_overrides, root)
                  if stage_b_config is not None else None)
        if first is not None and first.stage == "b":
            if second is not None:
                raise UserError("the first config is a Stage B config; pass the Stage C config "
                                "first and the Stage B config second")
            first, second = None, first
        return cls(first, second, device=device, offload=offload, progress=progress)

    # ------------------------------------------------------------------ components loaded lazily
    @cached_property
    def gdf_c(self) -> Any:
        """The Stage C GDF (docs/OFFICIAL.md, Training objects)."""
        from gdf import presets

        return presets.stage_c()

    @cached_property
    def gdf_b(self) -> Any:
        """The Stage B GDF (docs/OFFICIAL.md, Training objects)."""
        from gdf import presets

        return presets.stage_b()

    @cached_property
    def effnet(self) -> torch.nn.Module:
        """EfficientNet encoder (image -> Stage C latent); loaded on first use."""
        cfg = self.cfg_c if self.cfg_c is not None and self.cfg_c.effnet_checkpoint_path else self.cfg_b
        return load_aux("effnet", cfg, "effnet_checkpoint_path", self.placement.home)

    @cached_property
    def previewer(self) -> torch.nn.Module:
        """Previewer (Stage C latent -> small image); loaded on first use."""
        return load_aux("previewer", self._need("c", "previews"), "previewer_checkpoint_path",
                        self.placement.home)

    @cached_property
    def vision_model(self) -> Any:
        """CLIP vision model (image variation); loaded on first use."""
        cfg = self._need("c", "image variation")
        return load_clip_image(cfg.clip_image_model_name, self.dtype, self.placement.home)

    def _need(self, stage: str, what: str) -> InferenceConfig:
        cfg = self.cfg_c if stage == "c" else self.cfg_b
        if cfg is None:
            flag = "--config" if stage == "c" else "--stage-b-config"
            raise UserError(f"{what} needs a Stage {stage.upper()} config ({flag})")
        return cfg

    def _load_lora(self) -> tuple[list, list[str]]:
        from inference.lora_files import load_lora_files

        if self.cfg_c.lora_checkpoint_path:
            from inference.models import require_file

            require_file(self.cfg_c, "lora_checkpoint_path", "the LoRA")
        return load_lora_files(self.stage_c, self.tokenizer, self.text_model, self.cfg_c)

    def _load_controlnet(self) -> None:
        from inference.control import build_filter, needs_effnet

        cfg = self.cfg_c
        effnet = self.effnet if needs_effnet(cfg.controlnet_filter) else None
        self.cnet_filter = build_filter(cfg.controlnet_filter, cfg.controlnet_filter_params,
                                        self.device, effnet)
        c_proj = self.stage_c.embedding[1].out_channels
        self.controlnet = load_controlnet(cfg, self.cnet_filter.num_channels(), c_proj, self.dtype,
                                          self.placement.home)

    def set_lora_strength(self, strength: float) -> None:
        """Change the strength of every loaded LoRA in place (exact; 0 = the base model)."""
        if self.lora is None:
            raise UserError("no LoRA loaded (set lora_checkpoint_path in the Stage C config)")
        for lora in self.loras:
            lora.set_strength(strength)

    # ------------------------------------------------------------------ settings and conditions
    def settings_c(self, **overrides: Any) -> SamplingSettings:
        """Stage C settings: official (docs/OFFICIAL.md, Official sampling settings) <- config keys <- ``overrides``."""
        return self._settings(sampling.STAGE_C_INFERENCE, self.cfg_c, overrides)

    def settings_b(self, **overrides: Any) -> SamplingSettings:
        """Stage B settings: official (docs/OFFICIAL.md, Official sampling settings) <- config keys <- ``overrides``."""
        return self._settings(sampling.STAGE_B_INFERENCE, self.cfg_b, overrides)

    @staticmethod
    def _settings(base: SamplingSettings, cfg: Optional[InferenceConfig],
                  overrides: Mapping[str, Any]) -> SamplingSettings:
        if cfg is not None:
            base = base.replace(timesteps=cfg.steps, cfg=cfg.cfg, shift=cfg.shift,
                                sampler=cfg.sampler and cfg.sampler.lower(), cfg_rho=cfg.cfg_rho)
        return base.replace(**overrides)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip_text (B,77,C), clip_text_pooled (B,1,C)) on the device."""
        from modules.conditioning import encode_text

        with self.placement.use(self.text_model), sampling.autocast_for(self.device, self.dtype):
            text, pooled = encode_text(self.tokenizer, self.text_model, list(captions))
        return text.to(self.device), pooled.to(self.device)

    def stage_c_conditions(self, prompts: Sequence[str], clip_img: Optional[torch.Tensor] = None,
                           negative: Optional[Sequence[str]] = None) -> tuple[dict, dict]:
        """(conditions, unconditions) for Stage C: prompts vs "" (docs/OFFICIAL.md, Stage C conditions), or
        vs the ``negative`` prompts (one per prompt); image embeds given -> conditional only, zeros otherwise."""
        batch = len(prompts)
        text, pooled = self.encode_text(prompts)
        text_u, pooled_u = self.encode_text(list(negative) if negative is not None else [""] * batch)
        width = self.stage_c.clip_img_mapper.in_features
        zeros = torch.zeros(batch, 1, width, device=self.device, dtype=pooled.dtype)
        image = zeros if clip_img is None else _repeat_to(clip_img, batch).to(self.device, pooled.dtype)
        return ({"clip_text": text, "clip_text_pooled": pooled, "clip_img": image},
                {"clip_text": text_u, "clip_text_pooled": pooled_u, "clip_img": zeros})

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] -> Stage C (effnet) latents (B,16,H/32,W/32), float32."""
        from modules.effnet import imagenet_normalize

        # Normalised on the CPU in float32, then moved (as before): same numbers on every device.
        with self.placement.use(self.effnet):
            return self.effnet(imagenet_normalize(images.float()).to(self.device)).float()

    def clip_image_embeds(self, images: ImageLike) -> torch.Tensor:
        """CLIP image embeddings (B,1,C) of input images (image variation)."""
        from modules.conditioning import encode_images_clip

        with torch.no_grad(), self.placement.use(self.vision_model):
            return encode_images_clip(self.vision_model, to_batch(images).to(self.device))

    # ------------------------------------------------------------------ the three stages
    def control(self, control_image: ImageLike, batch: int, height: int, width: int,
                generator: torch.Generator) -> list:
        """ControlNet outputs for a control image (resized to the size Stage C was trained at:
        32x the latent, e.g. 768 for a 1024 output)."""
        if self.controlnet is None:
            raise UserError("a control image needs a ControlNet config (controlnet_* keys)")
        from inference.control import control_list

        _, _, hc, wc = sampling.stage_c_shape(batch, height, width)
        images = _repeat_to(resize_cover_crop(to_batch(control_image), hc * 32, wc * 32), batch)
        extra = [self.effnet] if getattr(self.cnet_filter, "effnet", None) is not None else []
        with self.placement.use(self.controlnet, *extra):
            cnet, _preview = control_list(self.cnet_filter, self.controlnet, images,
                                          self.cfg_c.cnet_multiplier, generator)
        return cnet

    def sample_stage_c(self, prompts: Sequence[str], height: int, width: int, generator: Seed = 0,
                       settings: Optional[SamplingSettings] = None,
                       clip_img: Optional[torch.Tensor] = None, control_image: Optional[ImageLike] = None,
                       x_init: Optional[torch.Tensor] = None, negative: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Stage C latents (B,16,ceil(H/42.67),ceil(W/42.67)) for a list of prompts (``negative``: one
        negative prompt per prompt, the unconditional side of the guidance; default "")."""
        self._need("c", "text-to-image")
        _check_size(height, width)
        generator = _generator(generator)
        settings = settings or self.settings_c()
        if negative is not None and len(negative) != len(prompts):
            raise UserError(f"give one negative prompt per prompt ({len(prompts)}), got {len(negative)}")
        cond, uncond = self.stage_c_conditions(prompts, clip_img, negative)
        if control_image is not None:
            cond["cnet"] = uncond["cnet"] = self.control(control_image, len(prompts), height, width,
                                                         generator)
        # latent channels = the embedding conv's input (16 = the EfficientNet latent width)
        channels = self.stage_c.embedding[1].in_channels // self.stage_c.embedding[0].downscale_factor ** 2
        shape = sampling.stage_c_shape(len(prompts), height, width, channels)
        with self.placement.use(self.stage_c):
            return sampling.sample_stage_c(self.stage_c, self.gdf_c, cond, uncond, shape, settings,
                                           generator=generator, x_init=x_init, device=self.device,
                                           progress="Stage C" if self.progress else False)

    def sample_stage_b(self, latents_c: torch.Tensor, prompts: Sequence[str], height: int, width: int,
                       generator: Seed = 0, settings: Optional[SamplingSettings] = None) -> torch.Tensor:
        """Stage B latents (B,4,ceil(H/4),ceil(W/4)) conditioned on Stage C latents (or effnet
        latents of real images) and the pooled prompt embedding."""
        self._need("b", "decoding to full resolution")
        _check_size(height, width)
        generator = _generator(generator)
        settings = settings or self.settings_b()
        _, pooled = self.encode_text(prompts)
        _, pooled_u = self.encode_text([""] * len(prompts))
        cond, uncond = sampling.stage_b_conditions(pooled, pooled_u, latents_c.to(self.device))
        shape = sampling.stage_b_shape(len(prompts), height, width)
        with self.placement.use(self.stage_b):
            return sampling.sample_stage_b(self.stage_b, self.gdf_b, cond, uncond, shape, settings,
                                           generator=generator, device=self.device,
                                           progress="Stage B" if self.progress else False)

    def decode(self, latents_b: torch.Tensor) -> torch.Tensor:
        """Stage A: Stage B latents -> images (B,3,4h,4w) in [0,1] (no quantisation)."""
        self._need("b", "Stage A decoding")
        with self.placement.use(self.stage_a):
            return sampling.decode_stage_a(self.stage_a, latents_b)

    def preview(self, latents_c: torch.Tensor) -> torch.Tensor:
        """Previewer: Stage C latents -> small images in [0,1] (what training previews show)."""
        with self.placement.use(self.previewer):
            return sampling.preview_stage_c(self.previewer, latents_c)

    # ------------------------------------------------------------------ user-level modes
    def _generate(self, prompts: list[str], height: int, width: int, seed: Seed,
                  settings_c: SamplingSettings, settings_b: SamplingSettings, mode: str,
                  generator: Optional[torch.Generator] = None, preview_only: bool = False,
                  **stage_c_kwargs: Any) -> list:
        generator = generator or _generator(seed)
        latents_c = self.sample_stage_c(prompts, height, width, generator, settings_c, **stage_c_kwargs)
        if self.cfg_b is None or preview_only:
            images = self.preview(latents_c)  # Stage C only: the Previewer's 8x decode
            used = {"stage_c": settings_c.as_dict(), "decoder": "previewer"}
        else:
            latents_b = self.sample_stage_b(latents_c, prompts, height, width, generator, settings_b)
            images = self.decode(latents_b)
            used = {"stage_c": settings_c.as_dict(), "stage_b": settings_b.as_dict()}
        # The metadata names the ControlNet only when a control image fed it: a ControlNet
        # config sampled without one is plain Stage C sampling (the CLI refuses it).
        control_used = stage_c_kwargs.get("control_image") is not None
        return self._annotate(to_pil(images), prompts, seed, mode, height, width, used,
                              control_used=control_used)

    def _annotate(self, images: list, prompts: Sequence[str], seed: Seed, mode: str, height: int,
                  width: int, used: Mapping[str, Any], control_used: bool = False) -> list:
        """Record what made each image in ``image.info`` (written as PNG text by the CLI)."""
        params = {"mode": mode, "height": height, "width": width, **used,
                  "stage_c_model": self.cfg_c and self.cfg_c.model_version,
                  "stage_b_model": self.cfg_b and self.cfg_b.model_version,
                  "lora": self.cfg_c.lora_checkpoint_path if self.lora is not None and len(self.loras) == 1 else
                  [m.source for m in self.loras] or None,
                  "lora_strength": self.lora.strength if self.lora is not None and len(self.loras) == 1 else
                  [m.strength for m in self.loras] or None,
                  "controlnet": self.cfg_c.controlnet_filter if self.controlnet is not None and control_used
                  else None}
        seed_text = "generator" if isinstance(seed, torch.Generator) else str(seed)
        for index, (image, prompt) in enumerate(zip(images, prompts)):
            image.info.update({"prompt": prompt, "seed": seed_text, "batch_index": str(index),
                               "parameters": json.dumps(params, sort_keys=True, default=str),
                               "software": "cascade-train inference"})
        return images

    def text_to_image(self, prompts: Union[str, Sequence[str]], *, num_images: int = 1,
                      height: int = 1024, width: int = 1024, seed: Seed = 0,
                      steps_c: Optional[int] = None, steps_b: Optional[int] = None,
                      cfg_c: Optional[float] = None, cfg_b: Optional[float] = None,
                      shift_c: Optional[float] = None, shift_b: Optional[float] = None,
                      sampler: Optional[str] = None, control_image: Optional[ImageLike] = None,
                      preview_only: bool = False, negative_prompt: Optional[str] = None) -> list:
        """Prompts -> PIL images of ``height`` x ``width`` (num_images per prompt, one batch).

        Without a Stage B config, or with ``preview_only``, the images are the Previewer's small
        Stage C previews (a quick look; Stage B and A are skipped). ``control_image`` feeds the
        configured ControlNet; without it a ControlNet config samples without control and the
        metadata records ``"controlnet": null``. ``negative_prompt``: the unconditional side of Stage C's
        guidance for every prompt (default "").
        """
        batch = _prompt_list(prompts, num_images)
        settings_c = self.settings_c(timesteps=steps_c, cfg=cfg_c, shift=shift_c, sampler=sampler)
        settings_b = self.settings_b(timesteps=steps_b, cfg=cfg_b, shift=shift_b, sampler=sampler)
        negative = None if not negative_prompt else [negative_prompt] * len(batch)
        images = self._generate(batch, height, width, seed, settings_c, settings_b, "text_to_image",
                                control_image=control_image, preview_only=preview_only, negative=negative)
        if negative is not None:
            for image in images:
                image.info["negative_prompt"] = negative_prompt
        return images

    def image_variation(self, images: ImageLike, prompts: Union[str, Sequence[str]] = "", *,
                        num_images: int = 1, height: int = 1024, width: int = 1024, seed: Seed = 0,
                        preview_only: bool = False, **overrides: Any) -> list:
        """Variations of an image: its CLIP image embedding conditions Stage C (docs/OFFICIAL.md, Inference recipes).

        ``overrides``: steps_c, steps_b, cfg_c, cfg_b, shift_c, shift_b, sampler.
        """
        batch = _prompt_list(prompts, num_images)
        clip_img = self.clip_image_embeds(images)
        return self._generate(batch, height, width, seed, *self._both(overrides), "image_variation",
                              clip_img=clip_img, preview_only=preview_only)

    def image_to_image(self, images: ImageLike, prompts: Union[str, Sequence[str]] = "", *,
                       strength: float = sampling.IMG2IMG_STRENGTH, num_images: int = 1,
                       height: int = 1024, width: int = 1024, seed: Seed = 0,
                       control_image: Optional[ImageLike] = None, preview_only: bool = False,
                       **overrides: Any) -> list:
        """Image-to-image: start Stage C at t = strength from the noised effnet latents.

        The input is resized/cropped to 32x the Stage C latent size (768 for a 1024 output, as in
        the notebooks). ``overrides`` as :meth:`image_variation`.
        """
        if not 0.0 < strength <= 1.0:
            raise UserError(f"strength must be in (0, 1], got {strength}")
        batch = _prompt_list(prompts, num_images)
        generator = _generator(seed)
        _, _, hc, wc = sampling.stage_c_shape(1, height, width)
        latents = self.encode_latents(resize_cover_crop(to_batch(images), hc * 32, wc * 32))
        x_init = sampling.img2img_init(self.gdf_c, _repeat_to(latents, len(batch)), strength, generator)
        settings_c, settings_b = self._both(overrides)
        return self._generate(batch, height, width, seed, sampling.img2img_settings(settings_c, strength),
                              settings_b, "image_to_image", generator=generator, x_init=x_init,
                              control_image=control_image, preview_only=preview_only)

    def _both(self, overrides: Mapping[str, Any]) -> tuple[SamplingSettings, SamplingSettings]:
        known = {"steps_c", "steps_b", "cfg_c", "cfg_b", "shift_c", "shift_b", "sampler"}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        o = overrides
        return (self.settings_c(timesteps=o.get("steps_c"), cfg=o.get("cfg_c"), shift=o.get("shift_c"),
                                sampler=o.get("sampler")),
                self.settings_b(timesteps=o.get("steps_b"), cfg=o.get("cfg_b"), shift=o.get("shift_b"),
                                sampler=o.get("sampler")))

    def reconstruct(self, images: Union[ImageLike, Sequence[ImageLike]], prompt: str = "", *,
                    size: Optional[int] = None, seed: Seed = 0, steps_b: Optional[int] = None,
                    cfg_b: Optional[float] = None, sampler: Optional[str] = None) -> list:
        """Stage B reconstruction: effnet latents of each image (full resolution) -> Stage B -> A.

        Each image is resized so its shorter side is ``size`` (default: the config's image_size,
        else unchanged) and centre-cropped to multiples of 64. Returns [(input, reconstruction)].
        """
        self._need("b", "reconstruction")
        size = size or self.cfg_b.image_size
        settings = self.settings_b(timesteps=steps_b, cfg=cfg_b, sampler=sampler)
        generator = _generator(seed)
        items = images if isinstance(images, (list, tuple)) else [images]
        pairs = []
        for item in items:
            image = to_batch(item)
            h, w = image.shape[-2:]
            if size:
                h, w = (size, round(w * size / h)) if h <= w else (round(h * size / w), size)
            h, w = max(64, h // 64 * 64), max(64, w // 64 * 64)
            image = resize_cover_crop(image, h, w)
            latents = self.encode_latents(image)
            latents_b = self.sample_stage_b(latents, [prompt], h, w, generator, settings)
            recon = self.decode(latents_b)
            original, = to_pil(image)
            result, = self._annotate(to_pil(recon), [prompt], seed, "reconstruct", h, w,
                                     {"stage_b": settings.as_dict()})
            pairs.append((original, result))
        return pairs
