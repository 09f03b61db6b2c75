"""The saliency network (MicroResNet) on synthetic weights of the released layout: the layout against
the manifest, strict loading, the InpaintFilter masks it makes, ``crop: smart`` (SmartCrop) in the
data pipeline with exact resume, the config rules, and a tiny inpainting ControlNet run."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.adapter_assets import cli_args, losses

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "tests/data/saliency_model.json").read_text())
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from tools.saliency_weights import write_synthetic_saliency

    return write_synthetic_saliency(tmp_path_factory.mktemp("saliency") / "saliency_model.pt")


@pytest.fixture(scope="module")
def net(weights):
    from modules.saliency import load_saliency_model

    return load_saliency_model(weights)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Photo-like (smooth) random images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=(h, w), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------ layout


def test_state_dict_matches_the_released_manifest():
    from modules.saliency import MicroResNet

    model = MicroResNet()
    sd = model.state_dict()
    assert list(sd) == MANIFEST["state_dict_keys_in_order"]
    assert {k: list(v.shape) for k, v in sd.items()} == MANIFEST["parameters"]
    assert len(sd) == MANIFEST["num_tensors"] == 35
    assert sum(v.numel() for v in sd.values()) == MANIFEST["total_parameters"] == 111_233
    assert not list(model.buffers()) and all(v.dtype == torch.float32 for v in sd.values())
    # 1/8 of the input size (stride 16 down, x2 up), values of a sigmoid
    out = model(torch.rand(1, 3, 240, 320))
    assert out.shape == (1, 1, 30, 40) and 0 < out.min() and out.max() < 1


def test_synthetic_files_load_strictly_and_bad_files_are_one_line(weights, tmp_path):
    from fileio.errors import CheckpointError
    from fileio.state_dicts import read_state_dict
    from modules.saliency import load_saliency_model
    from tools.saliency_weights import write_synthetic_saliency

    # the .pt is a plain state-dict pickle like the released file and reads with weights_only=True
    raw = torch.load(weights, weights_only=True)
    assert isinstance(raw, dict) and list(raw) == MANIFEST["state_dict_keys_in_order"]
    st = write_synthetic_saliency(tmp_path / "saliency.safetensors")
    a, b = load_saliency_model(weights), load_saliency_model(st)
    x = smooth_images(1, 96, 128)
    assert torch.equal(a(x), b(x)) and not a.training and not any(p.requires_grad for p in a.parameters())
    sd = read_state_dict(weights)
    sd["residual.1.bias"] = torch.zeros(64)  # the released grouped 1x1 conv has no bias
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt.*residual\.1\.bias") as err:
        load_saliency_model(tmp_path / "bad.pt")
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_saliency_model(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------- inpainting


def test_inpaint_masks_follow_the_official_recipe(net):
    from modules.filters import InpaintFilter, gaussian_blur_separable

    f = InpaintFilter(saliency_model=net)
    x = smooth_images(3, 160, 200)
    out, preview = f(x, gen(0), threshold=0.3, outpaint=False)
    # by hand: saliency of the 240-px copy (antialias) > t, nearest to (H, W), blur 141, > 0.5
    small = F.interpolate(x, size=(240, 300), mode="bilinear", align_corners=False, antialias=True)
    m = F.interpolate((net(small) > 0.3).float(), size=(160, 200), mode="nearest")
    expected = gaussian_blur_separable(m, 141) > 0.5
    assert torch.equal(out[:, 3:].bool(), expected)
    mask = expected.expand(-1, 3, -1, -1)
    assert torch.all(out[:, :3][mask] == 1.0) and torch.equal(out[:, :3][~mask], x[~mask])
    assert torch.equal(preview, out[:, :3]) and out.shape == (3, 4, 160, 200)
    inverted = f(x, gen(0), threshold=0.3, outpaint=True)[0][:, 3:].bool()
    assert (inverted ^ expected).float().mean() > 0.99  # complementary up to blur ties
    # drawn: one threshold and one outpaint coin per call (the official np.random draws), repeatable
    fracs = []
    for seed in range(6):
        a, b = f(x, gen(seed))[0], f(x, gen(seed))[0]
        assert torch.equal(a, b)
        fracs.append(a[:, 3].mean().item())
    assert max(fracs) - min(fracs) > 0.2
    assert f.coverage is None  # the official masks may be empty or full: no coverage rule


def test_inpaint_without_a_network_says_how_to_get_one(weights):
    from modules.filters import FilterError, InpaintFilter, resolve_filter

    f = resolve_filter("InpaintFilter", {"thresold": [0.04, 0.4], "p_outpaint": 0.4})
    assert f.needs_saliency_model
    with pytest.raises(FilterError, match="download_models.sh saliency.*spectral_residual"):
        f(smooth_images(1, 64, 64))
    lazy = InpaintFilter(saliency_model=str(weights))  # a path loads at the first call
    assert not lazy.needs_saliency_model and lazy(smooth_images(1, 64, 64), gen(0))[0].shape == (1, 4, 64, 64)
    with pytest.raises(FilterError, match="saliency must be one of"):
        InpaintFilter(saliency="cnn")


# --------------------------------------------------------------------------------------- smartcrop


def brightness(x: torch.Tensor) -> torch.Tensor:
    """A stand-in saliency function: mean brightness at 1/8 size."""
    return F.avg_pool2d(x.mean(1, keepdim=True), 8)


def test_smart_crop_picks_the_salient_region():
    from core.data.smartcrop import crop_offsets, saliency_centroid, smart_crop

    img = np.zeros((3, 96, 256), np.uint8)
    img[:, 30:70, 180:220] = 255  # the bright square, right of centre
    hits = 0
    for seed in range(20):
        crop = smart_crop(img, (96, 96), brightness, np.random.default_rng(seed))
        assert crop.shape == (3, 96, 96)
        hits += int(crop[0].sum() == 255 * 40 * 40)  # the whole square is inside the crop
    assert hits >= 17  # 30 % of the draws jitter by up to 0.2 * width
    no_jitter = smart_crop(img, (96, 96), brightness, np.random.default_rng(0))
    # centroid of the square ~ (50 / 96, 200 / 256): left = int(cx * 256 - 48)
    cy, cx = saliency_centroid(brightness(torch.from_numpy(img).float()[None] / 255))
    assert abs(cy - 0.5) < 0.1 and abs(cx - 200 / 256) < 0.05
    rng = np.random.default_rng(5)
    top, left = crop_offsets((cy, cx), (96, 256), (96, 96), rng, randomize_p=0.0)
    assert top == 0 and left == int(np.float32(cx) * 256 - 48)
    # clamped at the borders; the jitter always takes three draws
    assert crop_offsets((1.0, 1.0), (96, 256), (96, 96), np.random.default_rng(0), randomize_p=0.0) == (0, 160)
    assert crop_offsets((0.0, 0.0), (96, 256), (96, 96), np.random.default_rng(0), randomize_p=0.0) == (0, 0)
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    crop_offsets((0.5, 0.5), (96, 256), (96, 96), a, randomize_p=0.0)
    crop_offsets((0.5, 0.5), (96, 256), (96, 96), b, randomize_p=1.0)
    assert a.random() == b.random()
    assert no_jitter.shape == (3, 96, 96)


def _shard(path: Path, n: int = 6) -> Path:
    from core.data.tarwrite import write_tar
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        img = np.full((64, 128, 3), 40, np.uint8)
        x0 = int(rng.integers(0, 100))
        img[16:48, x0:x0 + 28] = 230  # a bright patch somewhere along the wide image
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        samples.append((f"{i:04d}", {"png": buf.getvalue(), "txt": f"sample {i}".encode()}))
    write_tar(str(path), samples)
    return path


def test_smart_crop_pipeline_is_deterministic_and_resumes_exactly(net, tmp_path):
    from core.data import DataConfig, DataError, build_pipeline

    shard = _shard(tmp_path / "wide-0000.tar")
    cfg = DataConfig(webdataset_path=str(shard), image_size=64, crop="smart", shuffle_buffer=4, num_workers=0)

    def batches(pipe, n):
        return [next(pipe)["images"] for _ in range(n)]

    pipe = build_pipeline(cfg, batch_size=2, seed=3, saliency=net)
    first = batches(pipe, 1)
    state = pipe.state_dict()
    rest = batches(pipe, 4)   # across the epoch end (6 samples)
    again = build_pipeline(cfg, batch_size=2, seed=3, saliency=net, state=state)
    assert all(torch.equal(a, b) for a, b in zip(rest, batches(again, 4)))
    fresh = build_pipeline(cfg, batch_size=2, seed=3, saliency=net)
    assert torch.equal(first[0], batches(fresh, 1)[0])
    # the bright patch is in the smart crops (the stand-in saliency finds it; a 64 px window of 128)
    smart = build_pipeline(cfg, batch_size=6, seed=3, saliency=brightness)
    imgs = next(smart)["images"].float()
    assert imgs.shape == (6, 3, 64, 64)
    assert (imgs.amax(dim=(1, 2, 3)) > 0.8).sum() >= 5
    with pytest.raises(DataError, match="saliency function"):
        build_pipeline(cfg, batch_size=2)
    auto = DataConfig(webdataset_path=str(shard), image_size=64, num_workers=0)
    assert auto.crop == "auto" and build_pipeline(auto, batch_size=2).spec.crop == "random"
    assert build_pipeline(auto, batch_size=2, saliency=net).spec.crop == "smart"


def test_smart_crop_in_a_worker_process(net, tmp_path):
    from core.data import DataConfig, build_pipeline

    shard = _shard(tmp_path / "wide-0000.tar", n=4)
    cfg = DataConfig(webdataset_path=str(shard), image_size=64, crop="smart", num_workers=0)
    inline = next(build_pipeline(cfg, batch_size=4, seed=1, saliency=net))["images"]
    pipe = build_pipeline(cfg, batch_size=4, seed=1, saliency=net, num_workers=1)
    try:
        assert torch.equal(next(pipe)["images"], inline)  # the network travels to the worker
    finally:
        pipe.close()


# ----------------------------------------------------------------------------------------- configs


def test_crop_auto_and_the_missing_file_error(weights, tmp_path):
    from core.config import load_config
    from core.errors import UserError
    from train.train_b import StageBConfig

    official = str(ROOT / "configs/training/finetune_b_3b.yaml")
    base = ["webdataset_path=x.tar", f"checkpoint_path={tmp_path}/ck", f"output_path={tmp_path}/out",
            f"effnet_checkpoint_path={weights}", f"stage_a_checkpoint_path={weights}",  # existing files
            "generator_checkpoint_path=null"]
    cfg = load_config(StageBConfig, official, base + [f"saliency_model_path={weights}"])
    assert cfg.crop == "smart"  # fixed-size official config: SmartCrop, as the official code
    cfg = load_config(StageBConfig, official, base + ["saliency_model_path=null"])
    assert cfg.crop == "random"
    cfg = load_config(StageBConfig, official, base + [f"saliency_model_path={weights}", "multi_aspect_ratio=['1/1']"])
    assert cfg.crop == "random"  # bucketing: the official random crop
    missing = str(tmp_path / "models" / "saliency_model.pt")
    with pytest.raises(UserError) as err:
        load_config(StageBConfig, official, base + [f"saliency_model_path={missing}"])
    msg = str(err.value)
    assert "saliency_model_path" in msg and "download_models.sh saliency" in msg and "crop: random" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="needs the saliency network"):
        load_config(StageBConfig, official, base + ["saliency_model_path=null", "crop=smart"])
    # validate-only (placeholder paths, weights not downloaded yet) passes
    assert load_config(StageBConfig, official, base + [f"saliency_model_path={missing}"], validate_only=True).crop == "smart"


# ---------------------------------------------------------------------------------------- training


def test_official_inpainting_config_trains_tiny_with_network_masks_and_resumes_exactly(adapter_assets, tmp_path):
    from train.train_c_controlnet import StageCControlNetTrainer

    config = str(ROOT / "configs/training/controlnet_c_3b_inpainting.yaml")
    extra = dict(model_version="tiny", controlnet_blocks=[0, 2, 5], controlnet_bottleneck_mode="simple",
                 use_fsdp=False, dataset_filters=None, wandb_project=None, wandb_entity=None, lr=0.1,
                 saliency_model_path=str(adapter_assets / "saliency_model.pt"), save_every=2, warmup_updates=1)
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert StageCControlNetTrainer.main(cli_args(config, adapter_assets, straight, experiment_id="inp",
                                                 **{**extra, "updates": 4})) == 0
    assert StageCControlNetTrainer.main(cli_args(config, adapter_assets, resumed, experiment_id="inp",
                                                 **{**extra, "updates": 2})) == 0
    assert StageCControlNetTrainer.main(cli_args(config, adapter_assets, resumed, experiment_id="inp",
                                                 **{**extra, "updates": 4})) == 0
    la, lb = losses(straight / "ck" / "inp"), losses(resumed / "ck" / "inp")
    assert len(la) == 4 and [la[s] for s in (3, 4)] == [lb[s] for s in (3, 4)]
    saved = (straight / "ck" / "inp" / "config.yaml").read_text()
    assert "crop: smart" in saved

    from core.config import load_config
    from core.distributed import init_distributed
    from modules.saliency import MicroResNet
    from tests.helpers.adapter_assets import overrides
    from train.train_c_controlnet import ControlNetConfig

    cfg = load_config(ControlNetConfig, config, overrides(adapter_assets, tmp_path / "c", **extra))
    flt = StageCControlNetTrainer(cfg, dist=init_distributed(), resume="never").build_filter()
    assert isinstance(flt.saliency_network(), MicroResNet) and flt.saliency == "model"
