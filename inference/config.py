"""Inference configuration: the official ``configs/inference/*.yaml`` keys as one typed dataclass.

A config describes ONE stage: a Stage C config (``model_version`` 3.6B/1B, effnet + previewer +
generator, optionally LoRA or ControlNet keys) or a Stage B config (3B/700M, effnet + Stage A +
generator). Unknown keys are rejected with the closest known key; relative paths are resolved
against a ``root`` folder (default: the current directory, like the official notebooks).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from inference.errors import UserError

STAGE_VERSIONS = {"c": ("3.6B", "1B", "tiny"), "b": ("3B", "700M", "tiny")}
SAMPLER_NAMES = ("ddpm", "ddim", "lcm")
DTYPES = ("float32", "bfloat16")
DEFAULT_CLIP_TEXT = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
DEFAULT_CLIP_IMAGE = "openai/clip-vit-large-patch14"
PATH_KEYS = ("effnet_checkpoint_path", "previewer_checkpoint_path", "generator_checkpoint_path",
             "stage_a_checkpoint_path", "lora_checkpoint_path", "controlnet_checkpoint_path")


def _doc(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"doc": text})


@dataclass
class InferenceConfig:
    """One stage of the cascade at inference time (keys as in the official inference configs)."""

    model_version: str = _doc("architecture: 3.6B/1B (Stage C), 3B/700M (Stage B), tiny (tests)", "")
    stage: Optional[str] = _doc("'c' or 'b'; derived from model_version when unset (needed for tiny)")
    dtype: Optional[str] = _doc("generator + CLIP dtype on GPUs with bf16 (bfloat16/float32); CPU "
                                "always runs float32")
    effnet_checkpoint_path: Optional[str] = _doc("EfficientNet encoder weights (image -> Stage C "
                                                 "latent; image-to-image, reconstruction, SR filter)")
    previewer_checkpoint_path: Optional[str] = _doc("Previewer weights (Stage C latent -> preview)")
    generator_checkpoint_path: Optional[str] = _doc("Stage C / Stage B generator weights (ours, or a diffusers StableCascadeUNet folder or file)")
    stage_a_checkpoint_path: Optional[str] = _doc("Stage A (VQGAN) weights, Stage B configs")
    clip_text_model_name: str = _doc("HF name or local folder of the CLIP text model + tokenizer",
                                     DEFAULT_CLIP_TEXT)
    clip_image_model_name: str = _doc("HF name or local folder of the CLIP vision model (image "
                                      "variation only)", DEFAULT_CLIP_IMAGE)
    # LoRA (configs/inference/lora_c_3b.yaml)
    module_filters: Optional[list[str]] = _doc("module-name substrings the LoRA targets (positional"
                                               " official LoRA files need it)")
    rank: Optional[int] = _doc("LoRA rank (official files: checked against the file)")
    train_tokens: Optional[list[list[Optional[str]]]] = _doc(
        "[[token_or_regex, init_regex_or_null], ...] replayed into the tokenizer before loading")
    lora_checkpoint_path: Optional[str] = _doc("LoRA file: official, named, ComfyUI or kohya layout")
    lora_strength: float = _doc("multiplier of the LoRA deltas (and trained token deltas)", 1.0)
    # ControlNet (configs/inference/controlnet_c_3b_*.yaml)
    controlnet_blocks: Optional[list[int]] = _doc("Stage C ResBlock call indices fed by the ControlNet")
    controlnet_filter: Optional[str] = _doc("filter class name, e.g. CannyFilter")
    controlnet_filter_params: Optional[dict] = _doc("keyword arguments of the filter")
    controlnet_bottleneck_mode: Optional[str] = _doc("ControlNet backbone: effnet (default), simple,"
                                                     " large")
    controlnet_checkpoint_path: Optional[str] = _doc("ControlNet weights")
    cnet_multiplier: float = _doc("multiplier of every ControlNet output (notebooks' knob)", 1.0)
    # sampling overrides (unset: the official settings, docs/OFFICIAL.md)
    sampler: Optional[str] = _doc("ddpm (official), ddim or lcm")
    steps: Optional[int] = _doc("sampling steps (official: 20 Stage C, 10 Stage B)")
    cfg: Optional[float] = _doc("guidance scale (official: 4 Stage C, 1.1 Stage B)")
    shift: Optional[float] = _doc("schedule shift (official: 2 Stage C, 1 Stage B)")
    cfg_rho: Optional[float] = _doc("CFG std rescaling (official 0.7)")
    # memory
    offload: bool = _doc("keep models on the CPU and move each to the GPU only while it runs", False)
    base_dtype: Optional[str] = _doc("int8 or float8_e4m3fn: store the generator's big weights (and, for the "
                                     "first stage's config, the CLIP text encoder's) in 8 bits, a scale per 64 "
                                     "weights, computing in dtype (modules/quantize.py); not with a LoRA, "
                                     "which is merged into the weights")
    # kept so the official stage_b_3b.yaml loads unchanged (its reconstruction notebook reads them)
    batch_size: Optional[int] = _doc("default images per prompt / reconstruction batch")
    image_size: Optional[int] = _doc("reconstruction: shorter side the input is resized to")
    webdataset_path: Optional[Union[str, list[str]]] = _doc("accepted for compatibility; unused")
    grad_accum_steps: Optional[int] = _doc("accepted for compatibility; unused")

    def validate(self) -> None:
        """Check values that the types alone cannot; raises UserError naming the key."""
        if not self.model_version:
            raise UserError("config: 'model_version' is required (3.6B/1B for Stage C, 3B/700M for "
                            "Stage B)")
        if self.stage is None:
            owners = [s for s, versions in STAGE_VERSIONS.items() if self.model_version in versions]
            if len(owners) != 1:
                raise UserError(f"config: cannot tell the stage from model_version "
                                f"{self.model_version!r}; set 'stage: c' or 'stage: b'")
            self.stage = owners[0]
        if self.stage not in STAGE_VERSIONS:
            raise UserError(f"config: stage must be 'c' or 'b', got {self.stage!r}")
        if self.model_version not in STAGE_VERSIONS[self.stage]:
            raise UserError(f"config: model_version {self.model_version!r} is not a Stage "
                            f"{self.stage.upper()} version; use one of "
                            f"{', '.join(STAGE_VERSIONS[self.stage])}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"config: dtype {self.dtype!r} is not supported; use bfloat16 or "
                            f"float32 (float16 overflows in these models)")
        if self.base_dtype is not None:
            from modules.quantize import QUANT_DTYPES

            if self.base_dtype not in QUANT_DTYPES:
                raise UserError(f"config: base_dtype {self.base_dtype!r} is not supported; use one of "
                                f"{', '.join(QUANT_DTYPES)} (or leave it unset)")
            if self.uses_lora:
                raise UserError("config: base_dtype does not combine with a LoRA at inference (the LoRA is "
                                "merged into the weights, which must then stay dense); remove one of them")
        if self.sampler is not None and self.sampler.lower() not in SAMPLER_NAMES:
            raise UserError(f"config: sampler {self.sampler!r} unknown; use one of "
                            f"{', '.join(SAMPLER_NAMES)}")
        if self.steps is not None and self.steps < 1:
            raise UserError("config: steps must be >= 1")
        if self.uses_controlnet:
            if self.stage != "c":
                raise UserError("config: controlnet_* keys are only valid in a Stage C config")
            if not self.controlnet_filter or self.controlnet_blocks is None:
                raise UserError("config: a ControlNet needs both 'controlnet_filter' and "
                                "'controlnet_blocks'")
        for key in PATH_KEYS:
            if getattr(self, key) == "":
                setattr(self, key, None)  # official identity config leaves the path empty

    @property
    def uses_controlnet(self) -> bool:
        """True when any ControlNet key is set."""
        return bool(self.controlnet_filter or self.controlnet_checkpoint_path
                    or self.controlnet_blocks)

    @property
    def uses_lora(self) -> bool:
        """True when a LoRA file is configured."""
        return bool(self.lora_checkpoint_path)


def _type_ok(value: Any, hint: Any) -> bool:
    """Small structural check of a YAML value against a type hint (enough for this config)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw


def resolve_path(path: Optional[str], root: Optional[Union[str, Path]]) -> Optional[str]:
    """Resolve a relative path against ``root`` (absolute paths and None pass through)."""
    if path is None or root is None or os.path.isabs(path):
        return path
    return str(Path(root) / path)


def resolve_model_name(name: str, root: Optional[Union[str, Path]]) -> str:
    """A CLIP name is a local folder when it exists under ``root``, else an HF name kept as is."""
    if root is not None and not os.path.isabs(name) and (Path(root) / name).is_dir():
        return str(Path(root) / name)
    return name


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line}")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a repeated mapping key (PyYAML keeps the last one silently). The
    training configs' reader is core.config_types; inference imports nothing of core but
    core.errors, hence this small twin."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_inference_config(source: Union[str, Path, Mapping[str, Any], InferenceConfig],
                          overrides: Sequence[str] = (),
                          root: Optional[Union[str, Path]] = None) -> InferenceConfig:
    """Read a YAML file or mapping into a validated ``InferenceConfig``.

    ``overrides`` are ``key=value`` strings (value parsed as YAML). ``root`` makes relative
    checkpoint paths (and CLIP folders that exist there) relative to that folder.
    """
    if isinstance(source, InferenceConfig):
        data = dataclasses.asdict(source)
        where = "config"
    elif isinstance(source, Mapping):
        data, where = dict(source), "config"
    else:
        where = str(source)
        try:
            with open(source, encoding="utf-8") as handle:
                data = yaml.load(handle, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
        except FileNotFoundError:
            raise UserError(f"{where}: config file not found") from None
        except _DuplicateKey as exc:
            raise UserError(f"{where} line {exc.line}: key '{exc.key}' is set twice (first at line "
                            f"{exc.first_line}); keep one") from None
        except yaml.YAMLError as exc:
            raise UserError(f"{where}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a mapping of keys at the top level")
    for item in overrides:
        key, value = _parse_override(item)
        data[key] = value
    hints = typing.get_type_hints(InferenceConfig)
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{where}: unknown key '{key}'{hint}")
        if not _type_ok(value, hints[key]):
            raise UserError(f"{where}: key '{key}' must be {_type_name(hints[key])}, "
                            f"got {value!r}")
    cfg = InferenceConfig(**data)
    cfg.validate()
    if root is not None:
        for key in PATH_KEYS:
            setattr(cfg, key, resolve_path(getattr(cfg, key), root))
        cfg.clip_text_model_name = resolve_model_name(cfg.clip_text_model_name, root)
        cfg.clip_image_model_name = resolve_model_name(cfg.clip_image_model_name, root)
    return cfg
