"""What the CPU demo shows after training: samples for the dataset's captions, retrieval, the grid.

* :func:`sample_captions`: Stage C samples of a trained generator for captions, decoded by the
  Previewer (the demo's frozen parts, the same sampler code as the training previews);
* :func:`retrieval`: for each sample, the nearest photo (pixel MSE at preview size); a hit when it
  is the captioned photo;
* :func:`write_grid`: one row per caption: caption, real photo, Previewer reconstruction, sample.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_captions(generator_path: Path, model_version: str, clip_text: Path, previewer_path: Path,
                    captions: Sequence[str], latent_hw: tuple[int, int], settings, seed: int = 0,
                    c_clip_img: int = 24, lora: Path | None = None) -> Tensor:
    """Previewer images (N,3,8h,8w) in [0,1] of one Stage C sample per caption (seeded); ``lora``: a
    LoRA file merged first, its trained tokens replayed from its metadata (tools/lora_photos.py)."""
    from gdf import presets
    from inference.sampling import run_sampler
    from modules.conditioning import encode_text, load_clip_text, load_tokenizer
    from modules.loading import load_detected, load_model

    generator = load_model("stage_c", model_version, generator_path).eval()
    previewer = load_detected("previewer", previewer_path).eval()
    tokenizer, text_model = load_tokenizer(str(clip_text)), load_clip_text(str(clip_text), dtype=torch.float32,
                                                                           device="cpu")
    if lora is not None:
        from inference.lora import apply_lora_file
        from inference.tokens import add_train_tokens
        from modules.lora_formats import metadata_list, read_lora_file

        add_train_tokens(tokenizer, text_model, metadata_list(read_lora_file(str(lora))[1], "train_tokens"))
        apply_lora_file(generator, str(lora), 1.0, text_model=text_model)
    n = len(captions)
    with torch.no_grad():
        def conditions(texts: list[str]) -> dict:
            text, pooled = encode_text(tokenizer, text_model, texts)
            return {"clip_text": text, "clip_text_pooled": pooled, "clip_img": torch.zeros(n, 1, c_clip_img)}

        cond, uncond = conditions(list(captions)), conditions([""] * n)
        latents = run_sampler(generator, presets.stage_c(), cond, uncond, (n, 16, *latent_hw), settings,
                              generator=torch.Generator().manual_seed(seed), device="cpu")
        return previewer(latents).float().clamp(0, 1)


def reconstruct(effnet_path: Path, previewer_path: Path, photos: Tensor) -> Tensor:
    """The Previewer's view of ``photos`` ((N,3,H,W) in [0,1]): decode(encode(photo))."""
    from modules.effnet import imagenet_normalize
    from modules.loading import load_detected

    effnet = load_detected("effnet", effnet_path).eval()
    previewer = load_detected("previewer", previewer_path).eval()
    with torch.no_grad():
        return previewer(effnet(imagenet_normalize(photos))).float().clamp(0, 1)


def retrieval(samples: Tensor, photos: Tensor) -> list[int]:
    """Index of the nearest photo (mean squared pixel error, at the samples' size) per sample."""
    targets = F.interpolate(photos, size=samples.shape[-2:], mode="area")
    dist = ((samples[:, None] - targets[None]) ** 2).mean(dim=(2, 3, 4))
    return dist.argmin(dim=1).tolist()


def write_grid(path: Path, captions: Sequence[str], photos: Tensor, recon: Tensor, samples: Tensor,
               nearest: Sequence[int], cell: int = 96) -> Path:
    """PNG with one row per caption: caption text | real photo | reconstruction | sample."""
    from PIL import Image, ImageDraw

    def tile(img: Tensor) -> Image.Image:
        arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(arr).resize((cell, cell), Image.NEAREST)

    text_w, pad, head = 230, 4, 18
    grid = Image.new("RGB", (text_w + 3 * (cell + pad) + pad, head + len(captions) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(("photo", "Previewer(photo)", "sample")):
        draw.text((text_w + pad + j * (cell + pad), 4), title, fill="black")
    for i, caption in enumerate(captions):
        y = head + pad + i * (cell + pad)
        mark = "hit" if nearest[i] == i else f"miss (nearest: photo {nearest[i] + 1})"
        draw.multiline_text((pad, y + 4), "\n".join(textwrap.wrap(f"{i + 1}. {caption}", 36) + [mark]),
                            fill="black")
        for j, img in enumerate((photos[i], recon[i], samples[i])):
            grid.paste(tile(img), (text_w + pad + j * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    return path
