"""End-to-end inference on tiny CPU models: text -> image, seeds, LoRA, ControlNet, reconstruction,
and the training-preview sampler equivalence."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import sampling
from inference.pipeline import CascadePipeline
from tools.make_tiny_inference_assets import TINY_TOKEN, write_tiny_setup

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "inference"
FAST = dict(height=64, width=64, steps_c=3, steps_b=2)
CNET = [f"{k}={v}" for k, v in (("controlnet_blocks", "[0, 2, 5]"), ("controlnet_filter", "CannyFilter"),
                                ("controlnet_filter_params", "{resize: 64}"),
                                ("controlnet_bottleneck_mode", "simple"),
                                ("controlnet_checkpoint_path", "controlnet_tiny_canny.safetensors"))]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "inference_tiny"
    write_tiny_setup(root)
    return root


@pytest.fixture(scope="module")
def base(tiny_root):
    return CascadePipeline.from_config(CONFIGS / "tiny_c.yaml", CONFIGS / "tiny_b.yaml",
                                       root=tiny_root, progress=False)


@pytest.fixture(scope="module")
def full(tiny_root):
    """LoRA (official layout + a trained token) and a canny ControlNet on the same Stage C."""
    return CascadePipeline.from_config(CONFIGS / "tiny_lora_c.yaml", CONFIGS / "tiny_b.yaml",
                                       overrides=CNET, root=tiny_root, progress=False)


def _photo(size=64):
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size))


def _bytes(images):
    return [np.asarray(img).tobytes() for img in images]


def test_text_to_image_size_and_seed(base):
    images = base.text_to_image(["a red apple", "a dog"], height=64, width=128, seed=3,
                                steps_c=3, steps_b=2)
    assert [img.size for img in images] == [(128, 64), (128, 64)]
    again = base.text_to_image(["a red apple", "a dog"], height=64, width=128, seed=3,
                               steps_c=3, steps_b=2)
    assert _bytes(images) == _bytes(again)
    assert images[0].info["prompt"] == "a red apple" and images[0].info["seed"] == "3"
    first = base.sample_stage_c(["a red apple"], 64, 128, generator=3,
                                settings=base.settings_c(timesteps=3))
    other = base.sample_stage_c(["a red apple"], 64, 128, generator=4,
                                settings=base.settings_c(timesteps=3))
    assert first.shape == (1, 16, 2, 3) and not torch.equal(first, other)


def test_training_preview_sampler_equals_pipeline(base):
    """Training previews and the pipeline sample through the same functions (inference.sampling:
    ``run_sampler``, ``decode_stage_a``, ``preview_stage_c``): given the CLIP conditions, fresh
    GDF presets and a seeded generator they give exactly the pipeline's image."""
    from gdf import presets
    from modules.conditioning import encode_text

    from inference.images import to_pil

    prompts = ["a lighthouse"]
    expected = base.text_to_image(prompts, seed=11, **FAST)
    settings_c = sampling.STAGE_C_INFERENCE.replace(timesteps=3)
    settings_b = sampling.STAGE_B_INFERENCE.replace(timesteps=2)
    gen = sampling.make_generator(11)
    with torch.no_grad():
        text, pooled = encode_text(base.tokenizer, base.text_model, prompts)
        text_u, pooled_u = encode_text(base.tokenizer, base.text_model, [""])
    zeros = torch.zeros(1, 1, 24)
    latents_c = sampling.sample_stage_c(
        base.stage_c, presets.stage_c(),
        {"clip_text": text, "clip_text_pooled": pooled, "clip_img": zeros},
        {"clip_text": text_u, "clip_text_pooled": pooled_u, "clip_img": zeros},
        sampling.stage_c_shape(1, 64, 64), settings_c, generator=gen)
    cond_b, uncond_b = sampling.stage_b_conditions(pooled, pooled_u, latents_c)
    latents_b = sampling.sample_stage_b(base.stage_b, presets.stage_b(), cond_b, uncond_b,
                                        sampling.stage_b_shape(1, 64, 64), settings_b, generator=gen)
    got = to_pil(sampling.decode_stage_a(base.stage_a, latents_b))
    assert _bytes(got) == _bytes(expected)
    # the Stage C preview a training run shows equals the pipeline's preview-only output
    preview = to_pil(sampling.preview_stage_c(base.previewer, latents_c))
    assert _bytes(preview) == _bytes(base.text_to_image(prompts, seed=11, preview_only=True, **FAST))
    assert preview[0].size == (16, 16)


def _latents(pipe, prompt, seed, **kwargs):
    return pipe.sample_stage_c([prompt], 64, 64, generator=seed,
                               settings=pipe.settings_c(timesteps=3), **kwargs)


def test_lora_strength_zero_equals_no_lora(base, full):
    assert full.tokenizer.convert_tokens_to_ids(TINY_TOKEN) == 49408
    plain = _latents(base, "a photo of a dog", 5)
    full.set_lora_strength(0.0)
    assert torch.equal(_latents(full, "a photo of a dog", 5), plain)
    full.set_lora_strength(1.0)
    assert not torch.equal(_latents(full, "a photo of a dog", 5), plain)
    image, = full.text_to_image("a photo of a dog", seed=5, preview_only=True, **FAST)
    assert '"lora_strength": 1.0' in image.info["parameters"]
    # the trained token is one token in prompts (the base tokenizer splits it)
    ids = full.tokenizer(f"a {TINY_TOKEN} dog")["input_ids"]
    assert 49408 in ids and 49408 not in base.tokenizer(f"a {TINY_TOKEN} dog")["input_ids"]


def test_controlnet_input_changes_output(full):
    photo = _photo()
    black = Image.new("RGB", (64, 64))
    with_photo = _latents(full, "a house", 2, control_image=photo)
    assert not torch.equal(with_photo, _latents(full, "a house", 2, control_image=black))
    assert not torch.equal(with_photo, _latents(full, "a house", 2))
    assert torch.equal(with_photo, _latents(full, "a house", 2, control_image=photo))
    image, = full.text_to_image("a house", seed=2, control_image=photo, preview_only=True, **FAST)
    assert '"controlnet": "CannyFilter"' in image.info["parameters"]


def test_image_to_image_and_variation(base):
    photo = _photo()
    quick = dict(FAST, preview_only=True)
    img2img = base.image_to_image(photo, "a painting", strength=0.5, seed=1, **quick)
    assert '"t_start": 0.5' in img2img[0].info["parameters"]
    assert '"timesteps": 1' in img2img[0].info["parameters"]  # int(3 * 0.5)
    variation = base.image_variation(photo, num_images=2, seed=1, **quick)
    plain = base.text_to_image("", num_images=2, seed=1, **quick)
    assert len(variation) == 2 and _bytes(variation) != _bytes(plain)


def test_cli_writes_pngs_with_metadata(tiny_root, tmp_path):
    from inference.images import read_png_metadata
    from inference.sample import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na cat\n\na boat\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["--config", str(CONFIGS / "tiny_c.yaml"), "--root", str(tiny_root),
                 "--prompts-file", str(prompts), "--out", str(out), "--seed", "7",
                 "--height", "64", "--width", "64", "--steps-c", "2", "--no-progress"])
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000_a_cat.png", "00001_a_boat.png"]
    meta = read_png_metadata(files[1])
    assert meta["prompt"] == "a boat" and meta["seed"] == "8"  # one seed per batch
    assert '"timesteps": 2' in meta["parameters"] and '"decoder": "previewer"' in meta["parameters"]


def test_cli_prompt_file_with_per_prompt_settings(tiny_root, tmp_path):
    """kohya options per line (inference/prompts.py): size, steps, CFG, seed and negative prompt."""
    from inference.images import read_png_metadata
    from inference.sample import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 96 --h 64 --s 1 --l 2.5 --d 3 --n ugly\na boat\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["--config", str(CONFIGS / "tiny_c.yaml"), "--root", str(tiny_root), "--prompts-file", str(prompts),
                 "--out", str(out), "--seed", "7", "--height", "64", "--width", "64", "--steps-c", "2",
                 "--batch-size", "2", "--no-progress"]) == 0
    cat, boat = sorted(out.glob("*.png"))
    meta = read_png_metadata(cat)
    assert meta["seed"] == "3" and meta["negative_prompt"] == "ugly"
    assert '"timesteps": 1' in meta["parameters"] and '"cfg": 2.5' in meta["parameters"]
    assert '"width": 96' in meta["parameters"]
    boat_meta = read_png_metadata(boat)  # other settings: its own batch, the command line's values
    assert boat_meta["seed"] == "8" and "negative_prompt" not in boat_meta and '"timesteps": 2' in boat_meta["parameters"]


def test_reconstruction_of_a_real_photograph_from_the_cli(tiny_root, tmp_path):
    """effnet -> Stage B -> Stage A on a real photograph (400x600: resized, cropped to 64x64)."""
    from skimage import data

    from inference.images import read_png_metadata
    from inference.sample import main

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    out = tmp_path / "recon"
    assert main(["--config", str(CONFIGS / "tiny_b.yaml"), "--root", str(tiny_root),
                 "--reconstruct", str(photo), "--size", "64", "--steps-b", "2",
                 "--out", str(out), "--no-progress"]) == 0
    recon = Image.open(out / "00000_coffee_recon.png")
    assert recon.size == (64, 64)  # shorter side 64, 96 wide -> cropped to a multiple of 64
    assert Image.open(out / "00000_coffee_pair.png").size == (128, 64)  # original | reconstruction
    meta = read_png_metadata(out / "00000_coffee_recon.png")
    assert meta["source"] == str(photo) and '"mode": "reconstruct"' in meta["parameters"]
    assert np.asarray(recon).std() > 0


def test_cli_user_error_is_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "inference.sample", "--config", str(CONFIGS / "stage_c_3b.yaml"),
         "--root", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=str(CONFIGS.parents[1]), timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
