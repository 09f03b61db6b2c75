"""CLIP conditioning encoders (text and image) used by Stage C and Stage B, and a tiny offline CLIP.

The official scripts condition on:
* the tokenizer + ``CLIPTextModelWithProjection`` of ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``
  (``clip_text`` = output of the LAST transformer layer BEFORE the final layer norm, all 77 positions;
  ``clip_text_pooled`` = ``text_embeds``, the projected EOS token, as (B, 1, C));
* ``CLIPVisionModelWithProjection`` of ``openai/clip-vit-large-patch14`` (``image_embeds`` as (B, 1, C)).

Models are loaded from a local folder or a Hugging Face hub id. Nothing is downloaded when the hub is
offline (``HF_HUB_OFFLINE=1``) or ``local_files_only=True``: a model that is neither a local folder nor
in the local cache raises :class:`ClipModelNotFoundError` saying how to fetch it.

:func:`write_tiny_clip` writes small random text/vision CLIP folders with a WORKING tokenizer (built
from open_clip's bundled BPE vocabulary, no network) for tests and the CPU demo::

    python3 -m modules.conditioning write-tiny OUT_DIR      # -> OUT_DIR/text, OUT_DIR/vision
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 77  # CLIP's context length; Stage C's clip_text is always (B, 77, C)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# bigG's HF tokenizer pads with "!" (id 0), as open_clip does; the pad positions are part of clip_text,
# so a different pad token would change the conditioning the released Stage C was trained on.
# Being a registered special token, a literal "!" in a caption then encodes as id 0 with the tiny
# tokenizer (open_clip's own tokenizer gives "!</w>" = 256); real runs use bigG's own tokenizer files.
PAD_TOKEN = "!"


class ClipModelNotFoundError(OSError):
    """A CLIP model/tokenizer is neither a local folder nor available from the (offline) hub cache."""


# --------------------------------------------------------------------------------------------------
# Loading


def _hub_offline() -> bool:
    """True when the user asked Hugging Face libraries not to touch the network."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _looks_like_hub_id(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else (absolute, relative with ./, deeper paths,
    # ~) can only be meant as a local folder.
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    return name.count("/") <= 1 and name.strip() == name and name != ""


def _from_pretrained(loader, name_or_path: str, what: str, local_files_only: bool | None, **kwargs):
    """Call ``loader(source, ...)`` for a local folder or a hub id, with errors that say how to fix."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{what}: name_or_path must be a hub id or a folder path, got {type(name_or_path)!r}")
    name = os.fspath(name_or_path)
    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            return loader(str(folder), local_files_only=True, **kwargs)
        except OSError as err:
            raise ClipModelNotFoundError(
                f"{what}: local folder '{folder}' does not hold a loadable model/tokenizer ({err}). "
                "Expected the files written by save_pretrained (config.json + model.safetensors, or "
                "tokenizer files)."
            ) from err
    if folder.exists():
        raise ClipModelNotFoundError(
            f"{what}: '{name}' is a file; expected a folder written by save_pretrained or a hub id"
        )
    if not _looks_like_hub_id(name):
        raise ClipModelNotFoundError(
            f"{what}: folder '{name}' does not exist. Point the config key at a folder holding the model "
            "(e.g. one written by `python3 -m modules.conditioning write-tiny DIR`) or use a hub id."
        )
    offline = _hub_offline() if local_files_only is None else local_files_only
    try:
        return loader(name, local_files_only=offline, **kwargs)
    except Exception as err:  # re-raised with the fix; hub/network errors have many unrelated types
        mode = "offline mode / local_files_only" if offline else "download failed"
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ClipModelNotFoundError(
            f"{what}: hub model '{name}' is not a local folder and not in the Hugging Face cache ({mode}: "
            f"{type(err).__name__}: {reason}). Download it on a machine with internet access with "
            f"`huggingface-cli download {name}` (or `hf download {name}`), then run with HF_HUB_OFFLINE=1, "
            "or point the config key at a local folder holding it."
        ) from err


def load_tokenizer(name_or_path: str, local_files_only: bool | None = None):
    """Load the CLIP tokenizer (``AutoTokenizer``) from a local folder or hub id.

    ``local_files_only=None`` follows ``HF_HUB_OFFLINE``; ``True`` never touches the network.
    """
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "CLIP tokenizer", local_files_only)


def _load_frozen(model_cls, name_or_path, what, dtype, device, local_files_only):
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{what}: dtype must be a torch.dtype, got {dtype!r}")
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar per model; our callers log what they load, and the
    # bar would otherwise land in front of one-line user errors.
    hf_logging.disable_progress_bar()
    model = _from_pretrained(model_cls.from_pretrained, name_or_path, what, local_files_only, dtype=dtype)
    # Frozen encoders: eval (no dropout) and no parameter gradients. Gradients can still flow to
    # parametrizations added later (ReToken on the token embedding), so encode_text does not force
    # no_grad.
    return model.to(device=device).eval().requires_grad_(False)


def load_clip_text(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    local_files_only: bool | None = None,
):
    """Load a frozen ``CLIPTextModelWithProjection`` (eval mode, ``requires_grad=False``)."""
    from transformers import CLIPTextModelWithProjection

    return _load_frozen(CLIPTextModelWithProjection, name_or_path, "CLIP text model", dtype, device, local_files_only)


def load_clip_vision(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    local_files_only: bool | None = None,
):
    """Load a frozen ``CLIPVisionModelWithProjection`` (eval mode, ``requires_grad=False``)."""
    from transformers import CLIPVisionModelWithProjection

    return _load_frozen(CLIPVisionModelWithProjection, name_or_path, "CLIP vision model", dtype, device, local_files_only)


# --------------------------------------------------------------------------------------------------
# Encoding


def encode_text(tokenizer, text_model, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Encode captions as Stage C/B expect: ``(clip_text (B,77,C), clip_text_pooled (B,1,P))``.

    Tokenised to exactly 77 ids (truncation + max_length padding); input_ids AND attention_mask are
    passed, because the mask changes the hidden states at padding positions, which are part of
    clip_text. ``clip_text`` is ``hidden_states[-1]`` (before the final layer norm, unlike
    ``last_hidden_state``). The empty string is a valid caption (the unconditional embedding).
    Runs with whatever grad mode the caller set.
    """
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError("encode_text: captions must be a list of strings (wrap a single caption in a list)")
    if len(captions) == 0:
        raise ValueError("encode_text: captions is empty")
    tokens = tokenizer(
        list(captions), truncation=True, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt"
    )
    device = next(text_model.parameters()).device
    out = text_model(
        input_ids=tokens["input_ids"].to(device),
        attention_mask=tokens["attention_mask"].to(device),
        output_hidden_states=True,
    )
    return out.hidden_states[-1], out.text_embeds.unsqueeze(1)


def clip_preprocess(images: Tensor, size: int = 224) -> Tensor:
    """CLIP image preprocessing: shorter side -> ``size`` (bicubic, antialiased), centre crop, normalise.

    ``images``: float (B,3,H,W) in [0,1]. Computed in float32 (bicubic resize is not available for
    every low-precision dtype on CPU). Antialias is on, matching torchvision >= 0.17 on tensors.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images)
        raise ValueError(f"clip_preprocess: images must be a (B,3,H,W) tensor in [0,1], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"clip_preprocess: images must be float in [0,1], got {images.dtype}")
    x = images.float()
    x = TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size])
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_images_clip(vision_model, images: Tensor) -> Tensor:
    """CLIP image embeddings (``image_embeds``, not L2-normalised) of [0,1] images -> (B, 1, C).

    The crop size comes from the model config (224 for ViT-L/14; small for the tiny test model).
    """
    param = next(vision_model.parameters())
    pixels = clip_preprocess(images, size=int(vision_model.config.image_size))
    out = vision_model(pixel_values=pixels.to(device=param.device, dtype=param.dtype))
    return out.image_embeds.unsqueeze(1)


# --------------------------------------------------------------------------------------------------
# Tiny offline CLIP (tests, CPU demo)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in CLIP/GPT-2 vocabulary order.

    Printable latin-1 bytes stand for themselves and come first (so "!" is id 0); the remaining
    bytes map to code points 256, 257, ... in byte order and follow.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _open_clip_bpe_path() -> Path:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "write_tiny_clip needs open_clip_torch (pinned in requirements.txt) for its bundled BPE vocabulary"
        ) from err
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


def clip_bpe_vocab(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's 49408-entry vocabulary and its merges from the BPE merges file.

    Order (fixed by the released models): 256 byte symbols, the same with ``</w>``, one token per
    merge (48894 merges), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    path = Path(bpe_path) if bpe_path is not None else _open_clip_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is a version header; CLIP uses the first 49152 - 256 - 2 merges
    n_merges = 49152 - 256 - 2
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    if len(merges) != n_merges or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not a CLIP BPE merges file (expected {n_merges} merge pairs)")
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"{path}: built {len(vocab)} distinct tokens, expected 49408")
    return vocab, merges


def build_clip_tokenizer(bpe_path: str | Path | None = None):
    """A CLIP tokenizer equivalent to bigG's HF one (BOS 49406, EOS 49407, pad "!" = 0, 77 tokens)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab(bpe_path)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_LENGTH,
    )


def write_tiny_clip(
    folder: str | Path,
    text_width: int = 32,
    vision_width: int = 32,
    projection_dim: int = 32,
    vision_projection_dim: int | None = None,
    layers: int = 2,
    heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write tiny random CLIP folders ``folder/text`` (tokenizer + text model) and ``folder/vision``.

    The text model has the real 49408-token vocabulary and 77 positions, so the tokenizer output
    feeds it unchanged; widths/depth are tiny. ``projection_dim`` is the pooled text width
    (Stage C ``c_clip_text_pooled``, Stage B ``c_clip``), ``text_width`` the ``clip_text`` width
    (``c_clip_text``) and ``vision_projection_dim`` (default: projection_dim) the image embedding width
    (``c_clip_img``). Weights are seeded, so the same arguments give the same files.
    Returns ``(text_folder, vision_folder)``.
    """
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    for name, value in dict(text_width=text_width, vision_width=vision_width, projection_dim=projection_dim,
                            layers=layers, heads=heads, image_size=image_size, patch_size=patch_size).items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"write_tiny_clip: {name} must be a positive int, got {value!r}")
    if text_width % heads or vision_width % heads:
        raise ValueError(f"write_tiny_clip: text_width/vision_width must be divisible by heads={heads}")
    if image_size % patch_size:
        raise ValueError(f"write_tiny_clip: image_size={image_size} must be divisible by patch_size={patch_size}")
    vision_projection_dim = projection_dim if vision_projection_dim is None else vision_projection_dim

    root = Path(folder)
    text_dir, vision_dir = root / "text", root / "vision"
    tokenizer = build_clip_tokenizer()
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        projection_dim=projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",  # bigG uses exact GELU (OpenAI's ViT-L uses quick_gelu)
        # eos_token_id != 2 makes transformers pool at the FIRST eos position, which is the real EOS
        # because padding uses "!" (id 0), not the EOS token.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        projection_dim=vision_projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_model = CLIPTextModelWithProjection(text_cfg)
        vision_model = CLIPVisionModelWithProjection(vision_cfg)
    text_model.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    # vocab.json/merges.txt too, for tools that rebuild the tokenizer from the classic two files
    vocab, merges = clip_bpe_vocab()
    (text_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (text_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    vision_model.save_pretrained(vision_dir)
    return text_dir, vision_dir


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python3 -m modules.conditioning write-tiny OUT_DIR [--text-width N ...]``."""
    parser = argparse.ArgumentParser(prog="python3 -m modules.conditioning", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("write-tiny", help="write tiny random CLIP text/vision folders (offline)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--text-width", type=int, default=32)
    tiny.add_argument("--vision-width", type=int, default=32)
    tiny.add_argument("--projection-dim", type=int, default=32)
    tiny.add_argument("--vision-projection-dim", type=int, default=None)
    tiny.add_argument("--image-size", type=int, default=32)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        text_dir, vision_dir = write_tiny_clip(
            args.out_dir, text_width=args.text_width, vision_width=args.vision_width,
            projection_dim=args.projection_dim, vision_projection_dim=args.vision_projection_dim,
            image_size=args.image_size, seed=args.seed,
        )
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {text_dir} (tokenizer + text model) and {vision_dir} (vision model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
