"""Config loading: flat YAML (official key names) -> one composed dataclass per training script.

Each component owns a dataclass (``RunConfig`` here, ``OptimConfig`` in ``core/optim.py``,
``EMAConfig`` in ``core/ema.py``, ``DataConfig`` in ``core/data``); a script composes them by
multiple inheritance::

    @dataclass
    class Config(RunConfig, OptimConfig, EMAConfig, DataConfig):
        adaptive_loss_weight: bool = field(default=False, metadata={"doc": "..."})

Every field has a default and a ``metadata={"doc": ...}`` string. Required fields default to the
sentinel ``REQUIRED`` (always required) or ``REQUIRED_TRAIN`` (required when ``training`` is
true, the official ``EXPECTED_TRAIN``). Each component may define ``validate_<component>(self)``;
``validate_config`` calls them all, base components first.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

from core.config_types import DuplicateKey, TypeMismatch, coerce_value, load_yaml_unique, type_name
from core.errors import UserError

__all__ = [
    "REQUIRED", "REQUIRED_TRAIN", "MISSING", "RunConfig", "doc", "load_config", "validate_config",
    "config_to_dict", "save_config", "config_reference", "add_common_args", "parse_cli",
    "parse_override", "is_placeholder_path", "input_path_problem", "config_aliases", "check_folder_name",
    "MAX_LR", "MAX_BATCH_SIZE", "MAX_UPDATES", "MAX_PREVIEW_IMAGES",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Required:
    """Sentinel default of a field the user must set (``when_training``: only for training)."""

    def __init__(self, name: str, when_training: bool) -> None:
        self.name = name
        self.when_training = when_training

    def __repr__(self) -> str:
        return self.name

    def __copy__(self) -> "_Required":
        return self

    def __deepcopy__(self, memo: dict) -> "_Required":
        return self

    def __reduce__(self) -> str:
        # Pickling (spawned workers, torch.save of a config) must keep the singleton identity.
        return self.name


REQUIRED: Any = _Required("REQUIRED", when_training=False)
REQUIRED_TRAIN: Any = _Required("REQUIRED_TRAIN", when_training=True)
MISSING = REQUIRED  # alias used in the contract


# Upper bounds of keys whose absurd values would otherwise be accepted and fail late (or never).
# Each bound comes with the reason the error message gives.
MAX_LR = 1.0
_LR_REASON = ("AdamW moves every weight by about lr per update, so above 1 any network is destroyed "
              "in one step (the official configs use 1e-4)")
MAX_BATCH_SIZE = 2 ** 20
_BATCH_REASON = ("it is the GLOBAL batch of one update over every process; the official runs use "
                 "256-1024 and no cluster holds a million images per update")
MAX_UPDATES = 10 ** 8 - 1
_UPDATES_REASON = "state folders are named step_XXXXXXXX with 8 digits, which then stop sorting by step"
MAX_PREVIEW_IMAGES = 256
_PREVIEW_REASON = "every preview samples that many images with the full sampler"


def check_folder_name(key: str, value: Any) -> None:
    """UserError unless ``value`` is usable as ONE folder name (``key`` names the config key):
    non-empty, no path separator, not '.' or '..', no control characters, no surrounding spaces,
    at most 200 characters (file systems allow 255 bytes and the run adds suffixes)."""
    problem = None
    if not isinstance(value, str) or value == "":
        problem = "is empty"
    elif value in (".", ".."):
        problem = f"is {value!r}, which names an existing folder, not a new one"
    elif "/" in value or "\\" in value:
        problem = "contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "contains a control character"
    elif value != value.strip():
        problem = "starts or ends with a space"
    elif len(value.encode("utf-8")) > 200:
        problem = f"is {len(value.encode('utf-8'))} bytes long (at most 200)"
    if problem is not None:
        raise UserError(f"config key '{key}' = {value!r} {problem}; it names the run's folder, "
                        f"e.g. {key}: my_run_1")


def doc(default: Any, text: str, **kwargs: Any) -> Any:
    """Shorthand for ``field(default=..., metadata={"doc": text})``; lists/dicts get a factory."""
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": text}, **kwargs)
    return field(default=default, metadata={"doc": text}, **kwargs)


def is_placeholder_path(value: Any) -> bool:
    """The official configs ship placeholder paths such as ``/path/to/checkpoint``."""
    return isinstance(value, str) and ("/path/to" in value or value.startswith("s3://path/"))


def input_path_problem(key: str, path: str, kind: str = "file", fix: Optional[str] = None) -> Optional[str]:
    """The one-line error of config key ``key`` when ``path`` is not there as ``kind`` (``file``,
    ``folder`` or ``file_or_folder``); None when it is."""
    if kind == "folder":
        return None if os.path.isdir(path) else f"config key '{key}': folder not found: {path} ({fix or 'check the path in your config'})"
    if os.path.isfile(path) or (kind == "file_or_folder" and os.path.isdir(path)):
        return None
    from fileio.state_dicts import download_hint  # the error path only: keeps configs torch-free

    return f"config key '{key}': file not found: {path} ({fix or download_hint(path)})"


# --------------------------------------------------------------------------------------------
# RunConfig: the keys of the loop and the run (official meaning kept, see docs/CORE_API.md)
# --------------------------------------------------------------------------------------------
def per_rank_batch(batch_size: int, world_size: int, grad_accum_steps: int = 1) -> int:
    """Images one rank loads per micro-step: the GLOBAL ``batch_size`` / (``world_size`` x
    ``grad_accum_steps``). The split must be exact (the official code silently rounded the per-rank
    batch down, possibly to 0): otherwise a UserError suggesting the nearest exact batch sizes."""
    per_step = world_size * grad_accum_steps
    if per_step < 1 or batch_size % per_step != 0:
        lower = max(per_step, batch_size // max(per_step, 1) * per_step)
        raise UserError(
            f"config key 'batch_size' = {batch_size} is the GLOBAL batch and must be divisible by "
            f"world_size ({world_size}) x grad_accum_steps ({grad_accum_steps}) = {per_step}; "
            f"use e.g. batch_size={lower} or {lower + per_step}")
    return batch_size // per_step


@dataclass
class RunConfig:
    """Keys of the run and the training loop (official names and meanings)."""

    # --- run identity and folders
    experiment_id: str = doc(REQUIRED_TRAIN, "Run name: checkpoint sub-folder (checkpoint_path/experiment_id), output sub-folder and wandb run name.")
    checkpoint_path: str = doc(REQUIRED_TRAIN, "Root folder of checkpoints; the run writes checkpoint_path/experiment_id/.")
    output_path: str = doc(REQUIRED_TRAIN, "Root folder of preview images; the run writes output_path/experiment_id/.")
    training: bool = doc(True, "True for training jobs; False (inference/notebook configs) waives the training-only required keys.")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = doc(None, "Storage dtype of the generator and CLIP models (None = float32).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = doc("auto", "Autocast for the forward pass: 'auto' = bf16 on GPUs that support it, fp32 on CPU. fp16 is refused for Stage C.")
    allow_tf32: bool = doc(True, "Enable TF32 matmul/cuDNN on NVIDIA GPUs.")
    seed: int = doc(42, "Seed of every random generator (combined with rank and step, so runs and resumes repeat).")
    # --- logging
    wandb_project: Optional[str] = doc(None, "Weights & Biases project; enables wandb logging when set (offline when WANDB_MODE=offline; a warning if wandb is not installed).")
    wandb_entity: Optional[str] = doc(None, "Weights & Biases entity (user or team).")
    tensorboard: bool = doc(False, "Also log to TensorBoard event files (scalars, preview grids, validation figures), "
                                   "offline (core/tensorboard_log.py); needs the tensorboard package (pip install "
                                   "tensorboard). A failure is one warning and the run continues.")
    tensorboard_dir: Optional[str] = doc(None, "Folder of the TensorBoard event files (None = <run folder>/tensorboard).")
    log_every: int = doc(10, "Write a metrics.jsonl line every N optimizer updates.")
    # --- optimisation
    lr: float = doc(REQUIRED_TRAIN, f"Learning rate (AdamW by default); finite, > 0 and <= {MAX_LR:g}.")
    batch_size: int = doc(REQUIRED_TRAIN, f"GLOBAL batch per optimizer update, over all processes and accumulation steps: each rank loads batch_size / (world_size * grad_accum_steps) images per micro-step; must divide evenly; at most {MAX_BATCH_SIZE}.")
    grad_accum_steps: int = doc(1, "Micro-steps (forward/backward) per optimizer update.")
    updates: int = doc(REQUIRED_TRAIN, f"Number of optimizer updates of the run (the loop runs updates * grad_accum_steps micro-steps); at most {MAX_UPDATES}.")
    warmup_updates: int = doc(1, "Linear warmup length in updates: lr = lr * min(1, (n + 1) / warmup_updates) at update n (the first update already uses a non-zero lr); then the lr_scheduler curve.")
    max_nonfinite_steps: int = doc(5, "A non-finite loss skips the update; this many in a row stop the run with an error.")
    # --- checkpoints and previews
    save_every: int = doc(REQUIRED_TRAIN, "Checkpoint (and preview) period in optimizer updates; a checkpoint is also written at the end.")
    backup_every: Optional[int] = doc(None, "Every N updates keep an extra copy of the model files, named {name}_{N}k.safetensors ({name}_{step}.safetensors when the step is not a multiple of 1000), that retention never deletes. None = no backups.")
    keep_last: int = doc(3, "Number of newest complete training-state folders kept (backups are kept too).")
    preview_every: Optional[int] = doc(None, "Preview period in updates (None = save_every; 0 = never).")
    num_preview_images: int = doc(4, f"Images per preview grid (at most {MAX_PREVIEW_IMAGES}).")
    preview_prompts: list[str] = doc(
        ["a photograph of a cat sitting on a sofa", "a red sports car on a mountain road",
         "an astronaut riding a horse", "a bowl of fresh fruit on a wooden table"],
        "Fixed prompts of the preview grid (cycled to num_preview_images).")
    # --- models
    generator_checkpoint_path: Optional[str] = doc(None, "Pretrained weights of the trained network: a file, or a diffusers model folder where the job accepts one (None = from scratch).")
    use_fsdp: bool = doc(False, "Shard the trained network with FSDP2 (fully_shard) instead of DDP when running multi-process; for full finetunes.")
    gradient_checkpointing: Union[bool, int] = doc(False, "Recompute block activations in backward to save memory: true = every block, N (an integer >= 1) = every N-th block of the Stage B/C U-Net (blocks 0, N, 2N, ... in registration order; 1 = true), trading speed for memory in steps; also the frozen Stage C under ControlNet. Other networks (ControlNet, EfficientNet) recompute all their units whenever it is on.")
    compile: bool = doc(False, "torch.compile the trained network.")
    frozen_dtype: Optional[Literal["float32", "bfloat16"]] = doc(None, "Storage dtype of the frozen networks (CLIP text/vision, EfficientNet, Previewer, preview Stage B, and the frozen Stage C under LoRA/ControlNet); None = bfloat16 on GPUs that support it, float32 otherwise. Stage A (20M, decode only) stays float32.")
    # --- official keys kept for compatibility
    checkpoint_extension: Literal["safetensors"] = doc("safetensors", "Model file format (only safetensors).")
    dist_file_subfolder: str = doc("", "Official file:// rendezvous prefix; unused (torchrun/slurm env rendezvous), accepted for compatibility.")

    def validate(self, validate_only: bool = False) -> None:
        """Run every component's ``validate_<component>()`` (see ``validate_config``)."""
        validate_config(self, validate_only=validate_only)

    # -- helpers for components' validators -------------------------------------------------
    @property
    def validate_only(self) -> bool:
        """True while validating a config with placeholder paths (``--validate-only``)."""
        return bool(getattr(self, "_validate_only", False))

    def require(self, *keys: str, why: str = "") -> None:
        """UserError if one of ``keys`` is unset (None or REQUIRED)."""
        for key in keys:
            value = getattr(self, key)
            if value is None or isinstance(value, _Required):
                extra = f" ({why})" if why else ""
                raise UserError(f"config key '{key}' is required{extra}; set it in the YAML or with --set {key}=...")

    def check_file(self, key: str, folder_ok: bool = False) -> None:
        """UserError if the file named by ``key`` does not exist (skipped for None). ``folder_ok``:
        a folder is accepted too (a model folder; its loader checks what is inside). In validate-only
        mode the key is only recorded: ``--validate-only`` checks it (core/cli.py ``check_inputs``),
        allowing and listing placeholders and official files not downloaded yet."""
        self._check_input(key, "file_or_folder" if folder_ok else "file")

    def check_folder(self, key: str, fix: str = "check the path in your config") -> None:
        """UserError if the folder named by ``key`` does not exist (``fix``: how to make it);
        recorded like :meth:`check_file` in validate-only mode."""
        self._check_input(key, "folder", fix)

    def _check_input(self, key: str, kind: str, fix: Optional[str] = None) -> None:
        path = getattr(self, key)
        if path is None or isinstance(path, _Required):
            return
        if self.validate_only:
            self.input_paths[key] = (kind, fix)
            return
        problem = input_path_problem(key, path, kind, fix)
        if problem is not None:
            raise UserError(problem)

    @property
    def input_paths(self) -> dict[str, tuple[str, Optional[str]]]:
        """``{key: (kind, fix)}`` of the input paths the validators named in validate-only mode."""
        found = self.__dict__.get("_input_paths")
        if found is None:
            found = {}
            object.__setattr__(self, "_input_paths", found)
        return found

    def check_fraction(self, *keys: str) -> None:
        """UserError unless every config key in ``keys`` holds a number in [0, 1] (a probability)."""
        for key in keys:
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"config key '{key}' must be in [0, 1], got {value}")

    def per_rank_batch(self, world_size: int) -> int:
        """Images per rank per micro-step (:func:`per_rank_batch`)."""
        return per_rank_batch(self.batch_size, world_size, self.grad_accum_steps)

    def validate_run(self, world_size: Optional[int] = None) -> None:
        """Checks of the run keys; with ``world_size`` also the batch divisibility (the official
        code silently rounded the per-rank batch down, possibly to 0)."""
        positive = ["grad_accum_steps", "keep_last", "log_every", "max_nonfinite_steps", "num_preview_images"]
        if self.training:
            positive += ["updates", "save_every", "batch_size"]
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, int) and value < 1:
                raise UserError(f"config key '{key}' must be >= 1, got {value}")
        gc = self.gradient_checkpointing
        if not isinstance(gc, bool) and (not isinstance(gc, int) or gc < 1):
            raise UserError(f"config key 'gradient_checkpointing' must be true, false or a block period N >= 1 "
                            f"(every N-th block), got {gc!r}")
        for key in ("warmup_updates", "preview_every", "backup_every"):
            value = getattr(self, key)
            if isinstance(value, int) and value < 0:
                raise UserError(f"config key '{key}' must be >= 0, got {value}")
        if self.training and isinstance(self.lr, float):
            if not math.isfinite(self.lr) or not self.lr > 0:
                raise UserError(f"config key 'lr' must be a finite number > 0, got {self.lr}")
            if self.lr > MAX_LR:
                raise UserError(f"config key 'lr' = {self.lr:g} is above {MAX_LR:g}: {_LR_REASON}")
        bounds = [("num_preview_images", MAX_PREVIEW_IMAGES, _PREVIEW_REASON)]
        if self.training:
            bounds += [("batch_size", MAX_BATCH_SIZE, _BATCH_REASON), ("updates", MAX_UPDATES, _UPDATES_REASON)]
        for key, most, reason in bounds:
            value = getattr(self, key)
            if isinstance(value, int) and value > most:
                raise UserError(f"config key '{key}' = {value} is above {most}: {reason}")
        if self.training:
            check_folder_name("experiment_id", self.experiment_id)
            for key in ("checkpoint_path", "output_path"):
                if getattr(self, key) == "":
                    raise UserError(f"config key '{key}' is empty; give the root folder of the run's "
                                    f"{'checkpoints' if key == 'checkpoint_path' else 'previews'}")
        if not self.preview_prompts:
            raise UserError("config key 'preview_prompts' must list at least one prompt")
        if world_size is not None and self.training and isinstance(self.batch_size, int):
            per_rank_batch(self.batch_size, world_size, self.grad_accum_steps)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:  # a broken annotation is a programming error, say which class
        raise TypeError(f"cannot resolve type hints of {cls.__name__}: {exc}") from exc


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value parsed with yaml.safe_load)."""
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set expects KEY=VALUE, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {key}: cannot parse value '{raw}' as YAML ({_first_line(exc)})") from None
    return key, value


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = load_yaml_unique(fh)
    except DuplicateKey as exc:
        raise UserError(f"config file {path} line {exc.line}: key '{exc.key}' is set twice (first at line "
                        f"{exc.first_line}); keep one") from None
    except OSError as exc:
        raise UserError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path}: not UTF-8 text (is it a YAML file?)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or _first_line(exc)
        raise UserError(f"config file {path}{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _int_hint(value: Any, tp: Any) -> str:
    """Why a number was not taken as an int: YAML reads ``1e12`` as text and ``1.0e12`` as a float."""
    if int not in (tp, *typing.get_args(tp)):
        return ""
    numeric_text = isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip())
    if isinstance(value, float) or numeric_text:
        return "; write a whole number without a decimal point or exponent, e.g. 1000"
    return ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_config(cls: type[T], path: Optional[str], overrides: Sequence[str] = (),
                validate_only: bool = False, world_size: Optional[int] = None,
                extra: Optional[dict] = None) -> T:
    """Read the YAML at ``path`` (None = no file), apply ``--set`` ``overrides`` and ``extra``
    (a dict applied last, e.g. ``{"training": False}``), check keys and types, check required
    keys, then run every component validator. ``validate_only`` allows placeholder paths and
    missing files (for the shipped official configs). ``world_size`` also checks the batch split."""
    source = path or "<defaults>"
    data: dict = _read_yaml(path) if path else {}
    origin: dict[Any, str] = {}  # key -> where it was set, for the error (the file, or the --set flag)
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
        origin[key] = f"--set {text}"
    if extra:
        data.update(extra)

    errors: list[str] = []  # every problem of the keys in one report, not one per run
    for alias, name in config_aliases(cls).items():
        if alias in data:
            if name in data:
                errors.append(f"{source}: config keys '{alias}' and '{name}' are the same setting; keep one")
                continue
            data[name] = data.pop(alias)
    known = _fields(cls)
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        where = origin.get(key, source)
        if not isinstance(key, str) or key not in known:
            errors.append(f"{where}: unknown config key '{key}'{_suggestion(str(key), known, config_hints(cls))}")
            continue
        try:
            values[key] = coerce_value(value, hints[key])
        except TypeMismatch:
            errors.append(f"{where}: config key '{key}' expects {type_name(hints[key])}, "
                          f"got {_short(value)} ({type(value).__name__}){_int_hint(value, hints[key])}")
            continue
        if isinstance(values[key], float) and not math.isfinite(values[key]):
            # No key means anything with NaN or infinity; accepting one only moves the failure
            # into the run (a NaN lr trains nothing and writes NaN weights).
            errors.append(f"{where}: config key '{key}' must be a finite number, got {values[key]}")

    cfg = cls(**values)
    training = bool(getattr(cfg, "training", True))
    for name in known:
        value = getattr(cfg, name)
        if isinstance(value, _Required) and (training or not value.when_training) and name not in data:
            errors.append(f"{source}: required config key '{name}' is missing "
                          f"({type_name(hints[name])}: {known[name].metadata.get('doc', '')})")
    _raise_all(errors)
    validate_config(cfg, validate_only=validate_only, world_size=world_size)
    return cfg


#: names other trainers (diffusers, kohya, ...) use for our keys: suggested, never accepted silently
COMMON_NAMES = {
    "learning_rate": "lr", "max_train_steps": "updates", "num_train_steps": "updates", "steps": "updates",
    "max_steps": "updates", "num_train_epochs": "updates", "epochs": "updates", "train_batch_size": "batch_size",
    "total_batch_size": "batch_size", "resolution": "image_size", "size": "image_size",
    "gradient_accumulation_steps": "grad_accum_steps", "mixed_precision": "precision", "output_dir": "output_path",
    "logging_dir": "checkpoint_path", "train_data_dir": "webdataset_path", "dataset": "webdataset_path",
    "checkpointing_steps": "save_every", "save_steps": "save_every", "lr_warmup_steps": "warmup_updates",
    "warmup_steps": "warmup_updates", "max_grad_norm": "grad_clip", "clip_grad_norm": "grad_clip",
    "adam_weight_decay": "weight_decay", "pretrained_model_name_or_path": "generator_checkpoint_path",
    "network_dim": "rank", "r": "rank", "network_alpha": "alpha",
    "gradient_checkpoint": "gradient_checkpointing", "use_ema": "ema_start_iters", "validation_steps": "preview_every",
}
def _suggestion(key: str, known: Mapping[str, Any], hints: Mapping[str, str]) -> str:
    """'; did you mean ...' for an unknown key: a common name for one of ours (``COMMON_NAMES`` and
    the config class's ``config_hints``), a close spelling, or where the key belongs."""
    common = {**COMMON_NAMES, **hints}.get(key.lower())
    if common in known:
        return f"; did you mean '{common}'? (this project's name for {key})"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    if key in hints:  # not one of ours under another name: where it belongs
        return f"; {hints[key]}"
    return ""


def _raise_all(errors: Sequence[str]) -> None:
    """One UserError listing every problem (one line: the CLI prints ``error: ...`` once)."""
    if len(errors) == 1:
        raise UserError(errors[0])
    if errors:
        raise UserError(f"{len(errors)} config errors: " + " | ".join(f"({i}) {e}" for i, e in enumerate(errors, 1)))


def config_hints(cls: type) -> dict[str, str]:
    """``{unknown key: our key, or where it belongs}`` from the ``config_hints`` class attributes of
    ``cls`` and its bases: the 'did you mean' of the names a job's users bring from elsewhere."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("config_hints", {}))
    return out


def config_aliases(cls: type) -> dict[str, str]:
    """``{alias: key}`` from the ``config_aliases`` class attributes of ``cls`` and its bases
    (other names users know for a key; the config then holds the key's own name)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("config_aliases", {}))
    return out


def _validators(cls: type) -> list[str]:
    """Names of ``validate_<component>`` methods, base components first, each once."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            if name.startswith("validate_") and callable(attr) and name not in names:
                names.append(name)
    return names


def validate_config(cfg: Any, validate_only: bool = False, world_size: Optional[int] = None) -> None:
    """Call every ``validate_<component>()`` of ``cfg``'s classes. ``validate_run`` also gets
    ``world_size``; ``cfg.validate_only`` tells validators to allow placeholder paths."""
    object.__setattr__(cfg, "_validate_only", validate_only)
    errors: list[str] = []  # each component's first problem, all in one report
    for name in _validators(type(cfg)):
        method = getattr(cfg, name)
        try:
            if name == "validate_run":
                method(world_size)
            else:
                method()
        except UserError as exc:
            errors.append(str(exc))
        except Exception:
            if errors:  # a later check tripped over an earlier problem: report the problems found
                break
            raise
    _raise_all(errors)


# --------------------------------------------------------------------------------------------
# Saving and documenting
# --------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, _Required):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Any) -> dict:
    """Every field as plain YAML-able values (tuples -> lists, unset required -> None)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config as YAML atomically (loadable again with ``load_config``)."""
    from fileio.atomic import atomic_write_bytes

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    atomic_write_bytes(path, text.encode("utf-8"))


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        value = f.default
    if value is REQUIRED:
        return "**required**"
    if value is REQUIRED_TRAIN:
        return "**required (training)**"
    return f"`{_plain(value)!r}`".replace("|", "\\|")


def config_reference(cls: type) -> str:
    """A markdown table of every key of ``cls``: name, type, default, doc."""
    hints = _hints(cls)
    lines = [f"### `{cls.__name__}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = type_name(hints[f.name]).replace("|", "\\|")
        text = str(f.metadata.get("doc", "")).replace("|", "\\|").replace("\n", " ")
        aliases = [a for a, k in config_aliases(cls).items() if k == f.name]
        if aliases:
            text += " Also accepted as " + ", ".join(f"`{a}`" for a in aliases) + "."
        lines.append(f"| `{f.name}` | `{tp}` | {_default_text(f)} | {text} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments every training script shares."""
    parser.add_argument("config", help="YAML config file (official keys at the top level)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (value parsed as YAML); repeatable")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, model sizes and first data shard, then exit")
    parser.add_argument("--simulate", action="store_true",
                        help="with --dry-run: also simulate one training step at full size on the CPU and print "
                             "its peak GPU memory beside the estimate (about a minute for a 3.6B network)")
    parser.add_argument("--validate-only", action="store_true",
                        help="only validate the config (placeholder paths and missing files allowed)")
    parser.add_argument("--resume", default="auto", metavar="{auto,never,PATH}",
                        help="auto: resume from the run's latest complete checkpoint if any (default); "
                             "never: start fresh; PATH: a run folder or a state/step_* folder")
    return parser


def parse_cli(argv: Optional[Iterable[str]] = None, prog: Optional[str] = None,
              description: Optional[str] = None) -> argparse.Namespace:
    """Parse the common training CLI; bad arguments raise UserError."""
    parser = add_common_args(_Parser(prog=prog, description=description))
    args = parser.parse_args(None if argv is None else list(argv))
    args.set = args.overrides  # the contract spells the option --set; both names work
    return args
