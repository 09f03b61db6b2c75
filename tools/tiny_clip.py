"""A tiny random CLIP (text + vision) with a WORKING tokenizer, fully offline, for tests and the CPU demo.

    python3 tools/tiny_clip.py OUT_DIR [--text-width 32 ...]      # -> OUT_DIR/text, OUT_DIR/vision

The tokenizer is built from open_clip's bundled BPE vocabulary (no network) and behaves like bigG's
Hugging Face one; the models are random, seeded and tiny, in the layout ``modules.conditioning``
loads (``save_pretrained`` folders).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from modules.conditioning import MAX_LENGTH

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# bigG's HF tokenizer pads with "!" (id 0), as open_clip does; the pad positions are part of clip_text,
# so a different pad token would change the conditioning the released Stage C was trained on.
# Being a registered special token, a literal "!" in a caption then encodes as id 0 with the tiny
# tokenizer (open_clip's own tokenizer gives "!</w>" = 256); real runs use bigG's own tokenizer files.
PAD_TOKEN = "!"


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
    def transformer(width: int) -> dict:  # the part both towers share: width, 4x MLP, depth, heads
        return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)

    text_cfg = CLIPTextConfig(
        **transformer(text_width),
        vocab_size=len(tokenizer),
        projection_dim=projection_dim,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",  # bigG uses exact GELU (OpenAI's ViT-L uses quick_gelu)
        # eos_token_id != 2 makes transformers pool at the FIRST eos position, which is the real EOS
        # because padding uses "!" (id 0), not the EOS token.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_cfg = CLIPVisionConfig(
        **transformer(vision_width),
        projection_dim=vision_projection_dim,
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
    """CLI: ``python3 tools/tiny_clip.py OUT_DIR [--text-width N ...]``; 2 on a user error."""
    parser = argparse.ArgumentParser(prog="python3 tools/tiny_clip.py", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--text-width", type=int, default=32)
    parser.add_argument("--vision-width", type=int, default=32)
    parser.add_argument("--projection-dim", type=int, default=32)
    parser.add_argument("--vision-projection-dim", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
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
