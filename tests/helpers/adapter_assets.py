"""Shared offline assets for the LoRA / ControlNet training tests (not a test module).

Frozen encoders, tiny CLIP and the tiny Stage C are random-init (seeded) files; the dataset holds
real photographs (scikit-image's sample photos) with captions that use a trained token, and a
pre-computed control image (``control.png``: the photo's Canny edges) per sample.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

CAPTIONS = ("a photo of [tinytok] the astronaut", "a photo of [tinytok] the cat",
            "a photo of a [tinytok] coffee cup", "a photo of a [tinytok] rocket")


def make_adapter_assets(base: Path) -> Path:
    """Build (once per session) and return the assets folder under ``base``."""
    folder = base / "adapter_assets"
    if (folder / "READY").is_file():
        return folder
    from tools.photo_shards import jpeg_bytes, photo_variant, write_tar
    from modules.filters import CannyFilter
    from fileio.state_dicts import save_safetensors
    from modules.registry import build_model
    from tools.make_demo_assets import make_models

    make_models(folder, calibration_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        generator = build_model("stage_c", "tiny")
        # A fresh Stage C has a zero output conv (every gradient but its own is zero): give the
        # "pretrained" base a random one so LoRA and tokens get gradients from the first step.
        torch.nn.init.xavier_uniform_(generator.clf[1].weight)
        save_safetensors(generator, folder / "stage_c_tiny.safetensors")
    canny = CannyFilter(resize=None)
    samples = []
    for i, caption in enumerate(CAPTIONS):
        photo = photo_variant(i, 64, 64, seed=1)
        image = torch.from_numpy(__import__("numpy").array(photo)).permute(2, 0, 1).float().div(255)[None]
        edges, _ = canny(image)
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray((edges[0, 0].numpy() * 255).astype("uint8"), mode="L").save(buf, format="PNG")
        samples.append((f"{i:04d}", {"jpg": jpeg_bytes(photo, 95), "txt": caption.encode(),
                                     "control.png": buf.getvalue(), "json": json.dumps({"i": i}).encode()}))
    write_tar(str(folder / "shards" / "adapter-0000.tar"), samples)
    (folder / "READY").write_text("ok\n")
    return folder


#: keys only the Stage C jobs have (a Stage B config rejects them)
STAGE_C_ONLY = ("previewer_checkpoint_path", "clip_image_model_name")


def overrides(assets: Path, run_root: Path, drop: tuple[str, ...] = (), **extra) -> list[str]:
    """``key=value`` overrides pointing a tiny config at the assets and ``run_root`` (without the
    keys in ``drop``)."""
    values = {
        "webdataset_path": str(assets / "shards"),
        "effnet_checkpoint_path": str(assets / "effnet_encoder.safetensors"),
        "previewer_checkpoint_path": str(assets / "previewer.safetensors"),
        "generator_checkpoint_path": str(assets / "stage_c_tiny.safetensors"),
        "clip_text_model_name": str(assets / "clip/text"),
        "clip_image_model_name": str(assets / "clip/vision"),
        "checkpoint_path": str(run_root / "ck"), "output_path": str(run_root / "out"),
        "image_size": 64, "batch_size": 2, "num_workers": 0, "log_every": 1, "warmup_updates": 1,
        "preview_every": 0, "num_preview_images": 2,
    }
    values.update(extra)
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items() if k not in drop]


def cli_args(config: str, assets: Path, run_root: Path, drop: tuple[str, ...] = (), **extra) -> list[str]:
    """Command-line arguments of a training script for ``config`` with ``overrides``."""
    out = [config]
    for item in overrides(assets, run_root, drop=drop, **extra):
        out += ["--set", item]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[int(rec["step"])] = rec["loss"]
    return out


def run_and_resume(trainer: Any, config: str, assets: Path, run_root: Path, run: dict) -> tuple[Path, Path]:
    """Run ``trainer`` for ``run`` (experiment ``a``) and again stopped after ``updates - 1`` and
    resumed (experiment ``b``); checks the resumed run equals the straight one (last loss, every
    tensor of ``lora.safetensors``) and returns both run folders."""
    from safetensors.torch import load_file

    updates = run["updates"]
    assert trainer.main(cli_args(config, assets, run_root, experiment_id="a", **run)) == 0
    assert trainer.main(cli_args(config, assets, run_root, experiment_id="b", **{**run, "updates": updates - 1})) == 0
    assert trainer.main(cli_args(config, assets, run_root, experiment_id="b", **run)) == 0
    run_a, run_b = run_root / "ck" / "a", run_root / "ck" / "b"
    la, lb = losses(run_a), losses(run_b)
    assert sorted(la) == list(range(1, updates + 1)) and la[updates] == lb[updates]
    a, b = load_file(run_a / "lora.safetensors"), load_file(run_b / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return run_a, run_b
