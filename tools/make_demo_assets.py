"""Make the small, fully offline assets that the CPU demo and the tests train on.

    python3 tools/make_demo_assets.py OUT_DIR [--image-size 128] [--variants 6] [--shards 2]

Writes, under OUT_DIR:
* ``shards/demo-000000.tar ...``  a captioned webdataset of REAL photographs (the ones bundled with
  scikit-image: astronaut, coffee, chelsea the cat, a rocket launch, motorcycles, ...), each with
  a hand-written caption and several random crops / horizontal flips for variety;
* ``clip/text``, ``clip/vision``  tiny random CLIP text/vision models with a working tokenizer
  (``tools/tiny_clip.py``), sized for the ``tiny`` Stage C / Stage B;
* ``effnet_encoder.safetensors``, ``previewer.safetensors``, ``stage_a.safetensors``: frozen
  encoder/decoder weights with RANDOM initialisation (seeded). These are demo assets, not the
  official weights: the demo and tests train a tiny Stage C / Stage B on top of them. The
  EfficientNet's final (non-affine) BatchNorm statistics are calibrated on the demo photographs so
  its latents are standardised, like the released encoder's; with ``--previewer-steps N`` the
  Previewer is fitted to decode those latents into the photographs' colours (the demo does this,
  so its previews are blurry pictures rather than noise).
* ``saliency_model.pt``: synthetic weights on the layout of the released saliency network
  (``tools/saliency_weights.py``), for ``crop: smart`` and the InpaintFilter masks.

The CPU demo (demo.py) uses :func:`make_demo_models` instead: the small ``effnet/demo`` encoder and
``previewer/demo`` fitted together on the demo photographs as an autoencoder
(tools/demo_autoencoder.py), so the Previewer's view of a photo is recognisable.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

#: (file in skimage/data, caption). Grey-scale photographs are converted to RGB.
PHOTOS = [
    ("astronaut.png", "a portrait of an astronaut in a white spacesuit in front of an american flag"),
    ("coffee.png", "a cup of coffee on a saucer with a spoon, seen from above"),
    ("chelsea.png", "a tabby cat looking to the side"),
    ("rocket.jpg", "a rocket lifting off from the launch pad with clouds of smoke"),
    ("motorcycle_left.png", "a red motorcycle parked in a garage"),
    ("motorcycle_right.png", "a shiny motorcycle seen from the side"),
    ("hubble_deep_field.jpg", "a deep field photograph of distant galaxies in space"),
    ("retina.jpg", "a medical photograph of the retina of a human eye"),
    ("ihc.png", "a microscope image of stained tissue cells"),
    ("coins.png", "old coins lying on a dark table"),
    ("camera.png", "a black and white photograph of a man with a camera on a tripod"),
    ("moon.png", "a black and white close-up of the surface of the moon"),
    ("brick.png", "a close-up of a brick wall"),
    ("grass.png", "a close-up of green grass"),
    ("gravel.png", "a close-up of grey gravel stones"),
]


def skimage_data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: scikit-image is not installed (python3 -m pip install -r requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_photos(limit: int | None = None) -> list[tuple[str, Image.Image, str]]:
    folder = skimage_data_dir()
    out = []
    for name, caption in PHOTOS[:limit]:
        path = folder / name
        if path.is_file():
            out.append((Path(name).stem, Image.open(path).convert("RGB"), caption))
    if not out:
        raise SystemExit(f"error: no photographs found in {folder}")
    return out


def variants(image: Image.Image, n: int, size: int, rng: random.Random, min_crop: float = 0.5) -> list[Image.Image]:
    """The full photo (centre square) plus random square crops (``min_crop``-100 % of the short
    side) and horizontal flips, resized to ``size`` x ``size``."""
    w, h = image.size
    short = min(w, h)
    out = []
    for i in range(n):
        if i == 0:
            side, left, top, flip = short, (w - short) // 2, (h - short) // 2, False
        else:
            side = int(short * rng.uniform(min_crop, 1.0))
            left, top = rng.randint(0, w - side), rng.randint(0, h - side)
            flip = rng.random() < 0.5
        crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(ImageOps.mirror(crop) if flip else crop)
    return out


def write_shards(samples: list[dict], folder: Path, n_shards: int, prefix: str = "demo") -> list[Path]:
    """Write ``samples`` ({'__key__', 'jpg' bytes, 'txt' str, 'json' dict}) into ``n_shards`` tars
    with the data layer's shard writer."""
    from core.data.tarwrite import write_tar

    folder.mkdir(parents=True, exist_ok=True)
    per = (len(samples) + n_shards - 1) // n_shards
    paths = []
    for s in range(n_shards):
        chunk = samples[s * per:(s + 1) * per]
        files = [(x["__key__"], {"jpg": x["jpg"], "txt": x["txt"].encode(), "json": json.dumps(x["json"]).encode()})
                 for x in chunk]
        paths.append(Path(write_tar(str(folder / f"{prefix}-{s:06d}.tar"), files)))
    return paths


def make_dataset(out_dir: Path, image_size: int = 128, n_variants: int = 6, n_shards: int = 2,
                 seed: int = 0, limit: int | None = None, same_image: bool = False,
                 min_crop: float = 0.5) -> list[Path]:
    """Shards of captioned photographs. ``same_image``: every sample is the astronaut at exactly
    ``image_size`` with one caption (for tests that need identical samples on every rank)."""
    rng = random.Random(seed)
    samples = []
    photos = load_photos(limit)
    for stem, image, caption in photos:
        pics = variants(image, 1 if same_image else n_variants, image_size, rng, min_crop)
        if same_image:
            pics = pics * n_variants * len(photos)
            caption = photos[0][2]
        for i, pic in enumerate(pics):
            buf = io.BytesIO()
            pic.save(buf, format="JPEG", quality=92)
            samples.append({"__key__": f"{stem}_{i:03d}", "jpg": buf.getvalue(), "txt": caption,
                            "json": {"width": pic.width, "height": pic.height, "source": f"skimage/data/{stem}"}})
        if same_image:
            break
    rng.shuffle(samples)
    return write_shards(samples, out_dir / "shards", n_shards)


def _calibrate_effnet(effnet: torch.nn.Module, images: torch.Tensor) -> None:
    """Set the final non-affine BatchNorm's running statistics to those of ``images``' features."""
    from modules.effnet import imagenet_normalize

    norms = [m for m in effnet.modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.affine]
    if not norms:
        return
    bn = norms[-1]
    captured = {}
    handle = bn.register_forward_pre_hook(lambda _m, inp: captured.__setitem__("x", inp[0].detach()))
    with torch.no_grad():
        effnet.eval()(imagenet_normalize(images))
    handle.remove()
    # A random backbone's features are tiny (~1e-6), far below BatchNorm's eps: rescale the 1x1
    # conv in front of the BatchNorm per channel so its output has unit variance, then set the
    # running statistics to the rescaled mean and variance 1.
    x = captured["x"].double()
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-20)
    conv = [m for m in effnet.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        conv.weight.div_(std.view(-1, 1, 1, 1).to(conv.weight.dtype))
        bn.running_mean.copy_((mean / std).float())
        bn.running_var.fill_(1.0)


def _fit_previewer(previewer: torch.nn.Module, effnet: torch.nn.Module, images: torch.Tensor,
                   steps: int, seed: int = 0) -> None:
    """Fit the (random-init) Previewer to decode the demo encoder's latents of ``images`` into
    their colours (a few Adam steps), so the demo's previews are blurry pictures, not noise."""
    import torch.nn.functional as F

    from modules.effnet import imagenet_normalize

    with torch.no_grad():
        latents = torch.cat([effnet.eval()(imagenet_normalize(images[i:i + 16])) for i in range(0, len(images), 16)])
    scale = latents.shape[-1] * 8 / images.shape[-1]
    targets = F.interpolate(images, scale_factor=scale, mode="area")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(previewer.parameters(), lr=2e-3)
    previewer.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (16,), generator=g)
        loss = F.mse_loss(previewer(latents[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    previewer.eval()


def make_models(out_dir: Path, calibration_size: int = 128, seed: int = 0,
                previewer_steps: int = 0) -> dict[str, Path]:
    """Random-init (seeded) frozen encoder/decoder weights + tiny CLIP folders.

    ``previewer_steps`` > 0 also fits the Previewer to the demo photographs (demo only)."""
    from tools.tiny_clip import write_tiny_clip
    from fileio.state_dicts import save_safetensors
    from modules.registry import build_model

    out_dir.mkdir(parents=True, exist_ok=True)
    text, vision = write_tiny_clip(out_dir / "clip", text_width=32, projection_dim=32,
                                   vision_projection_dim=24, seed=seed)
    paths = {"clip_text": text, "clip_vision": vision}
    effnet = None
    for kind in ("effnet", "previewer", "stage_a"):
        torch.manual_seed(seed)
        model = build_model(kind, "default")
        if kind == "effnet":
            photos = [v for _, img, _ in load_photos(6)
                      for v in variants(img, 1, calibration_size, random.Random(seed))]
            batch = torch.from_numpy(np.stack([np.asarray(p) for p in photos])).permute(0, 3, 1, 2).float() / 255
            _calibrate_effnet(model, batch)
            effnet = model
        if kind == "previewer" and previewer_steps > 0:
            photos = [v for _, img, _ in load_photos() for v in variants(img, 4, calibration_size, random.Random(seed))]
            batch = torch.from_numpy(np.stack([np.asarray(p) for p in photos])).permute(0, 3, 1, 2).float() / 255
            _fit_previewer(model, effnet, batch, previewer_steps, seed)
        name = {"effnet": "effnet_encoder", "previewer": "previewer", "stage_a": "stage_a"}[kind]
        path = out_dir / f"{name}.safetensors"
        save_safetensors(model, path, metadata={"note": "cascade-train demo asset: random init, NOT official weights"})
        paths[kind] = path
    from tools.saliency_weights import write_synthetic_saliency

    # saliency network weights on the released layout (crop: smart, InpaintFilter masks); own RNG
    paths["saliency"] = write_synthetic_saliency(out_dir / "saliency_model.pt", seed)
    return paths


def photo_batch(n_photos: int, n_variants: int, size: int, seed: int = 0, min_crop: float = 0.5) -> torch.Tensor:
    """(n_photos * n_variants, 3, size, size) in [0,1]: the first ``n_photos`` photographs' variants."""
    rng = random.Random(seed)
    pics = [v for _, img, _ in load_photos(n_photos) for v in variants(img, n_variants, size, rng, min_crop)]
    return torch.from_numpy(np.stack([np.asarray(p) for p in pics])).permute(0, 3, 1, 2).float() / 255


def make_demo_models(out_dir: Path, images: torch.Tensor, steps: int, seed: int = 0,
                     batch_size: int = 16) -> tuple[dict[str, Path], float]:
    """The CPU demo's frozen parts: tiny CLIP, and ``effnet/demo`` + ``previewer/demo`` fitted
    together as an autoencoder on ``images`` (tools/demo_autoencoder.py) for ``steps`` Adam steps
    of ``batch_size`` images. Returns the paths and the reconstruction PSNR (dB, at preview size)."""
    from fileio.state_dicts import save_safetensors
    from modules.registry import build_model
    from tools.demo_autoencoder import fit_autoencoder
    from tools.tiny_clip import write_tiny_clip

    out_dir.mkdir(parents=True, exist_ok=True)
    text, vision = write_tiny_clip(out_dir / "clip", text_width=32, projection_dim=32,
                                   vision_projection_dim=24, seed=seed)
    torch.manual_seed(seed)
    effnet, previewer = build_model("effnet", "demo"), build_model("previewer", "demo")
    fit = fit_autoencoder(effnet, previewer, images, steps, batch_size=batch_size, seed=seed)
    note = {"note": f"cascade-train demo asset: fitted on the demo photos ({fit.steps} steps), NOT official weights"}
    paths = {"clip_text": text, "clip_vision": vision, "effnet": out_dir / "effnet_encoder.safetensors",
             "previewer": out_dir / "previewer.safetensors"}
    save_safetensors(effnet, paths["effnet"], metadata=note)
    save_safetensors(previewer, paths["previewer"], metadata=note)
    return paths, fit.psnr


def make_all(out_dir: str | os.PathLike, image_size: int = 128, n_variants: int = 6, n_shards: int = 2,
             seed: int = 0, previewer_steps: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    paths = make_models(out, calibration_size=image_size, seed=seed, previewer_steps=previewer_steps)
    paths["shards"] = out / "shards"
    make_dataset(out, image_size=image_size, n_variants=n_variants, n_shards=n_shards, seed=seed)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--variants", type=int, default=6)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--previewer-steps", type=int, default=0,
                        help="fit the Previewer to the photos for this many Adam steps (the demo uses 60)")
    args = parser.parse_args(argv)
    paths = make_all(args.out_dir, args.image_size, args.variants, args.shards, args.seed, args.previewer_steps)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
