"""Masked loss: masks read, cut and bucketed with their images (mask file, alpha channel, image
folders), the missing-mask choice, the latent-grid weights, and the loss against a hand computation."""
import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import DataConfig, DataError, build_pipeline, write_tar
from core.errors import UserError
from gdf import presets
from train.diffusion_loss import DiffusionLoss
from train.masked_loss import MaskedLossConfig, latent_mask, masked_mean, pixel_weights


def png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def grey_pattern(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def batches(path, masks, n=3, **cfg):
    config = DataConfig(webdataset_path=str(path), image_size=32, **cfg)
    with build_pipeline(config, batch_size=n, num_workers=0, masks=masks) as pipe:
        return next(iter(pipe))


def test_mask_file_is_cut_exactly_like_the_image(tmp_path):
    """Each image is its own mask in grey (R = G = B = mask), so after the same random crop and
    bilinear resize the mask must equal the image's channel, pixel for pixel."""
    samples = []
    for i, (h, w) in enumerate([(48, 40), (40, 56), (33, 33)]):
        g = grey_pattern(h, w, i)
        samples.append((f"{i:04d}", {"png": png(np.stack([g] * 3, -1), "RGB"), "mask.png": png(g, "L"),
                                     "txt": b"x"}))
    write_tar(str(tmp_path / "s" / "a.tar"), samples)
    batch = batches(tmp_path / "s", "full", crop="random")
    assert batch["masks"].dtype == torch.uint8 and batch["masks"].shape == (3, 1, 32, 32)
    images = (batch["images"] * 255).round().to(torch.uint8)
    assert torch.equal(batch["masks"][:, 0], images[:, 0])


def test_alpha_channel_missing_masks_and_error_mode(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :16, 3] = 255  # opaque left half
    plain = np.full((32, 32, 3), 90, np.uint8)
    write_tar(str(tmp_path / "s" / "a.tar"), [("0000", {"png": png(rgba, "RGBA"), "txt": b"alpha"}),
                                              ("0001", {"png": png(plain, "RGB"), "txt": b"plain"})])
    batch = batches(tmp_path / "s", "full", n=2, crop="center")
    by_caption = dict(zip(batch["captions"], batch["masks"]))
    assert (by_caption["alpha"][0, :, :16] == 255).all() and (by_caption["alpha"][0, :, 16:] == 0).all()
    assert (by_caption["plain"] == 255).all()  # no mask: full weight
    with pytest.raises(DataError, match="sample 0001 in .*a.tar has no mask"):
        batches(tmp_path / "s", "error", n=2, crop="center")


def test_image_folder_mask_files(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    g = grey_pattern(32, 32, 7)
    Image.fromarray(np.stack([g] * 3, -1)).save(folder / "cat.png")
    Image.fromarray(g).save(folder / "cat.mask.png")
    (folder / "cat.txt").write_text("a cat")
    batch = batches(folder, "error", n=1, crop="center")
    assert batch["keys"] == ["cat"] and torch.equal(batch["masks"][0, 0], torch.from_numpy(g))


def test_smart_crop_is_refused(tmp_path):
    write_tar(str(tmp_path / "s" / "a.tar"), [("0000", {"png": png(np.zeros((32, 32, 3), np.uint8), "RGB"),
                                                        "txt": b"x"})])
    config = DataConfig(webdataset_path=str(tmp_path / "s"), image_size=32, crop="smart")
    with pytest.raises(DataError, match="do not combine with crop: smart"):
        build_pipeline(config, batch_size=1, num_workers=0, masks="full", saliency=lambda x: x[:, :1])


def test_latent_grid_is_the_area_average():
    m = torch.zeros(1, 1, 64, 64)
    m[..., :32, :48] = 1.0
    grid = latent_mask(m, (2, 2))
    assert grid[0, 0].tolist() == [[1.0, 0.5], [0.0, 0.0]]
    assert pixel_weights(m, (2, 2), 0.25)[0, 0].tolist() == [[1.0, 0.625], [0.25, 0.25]]


def test_masked_loss_is_the_loss_on_the_masked_region_by_hand():
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 1, 128, 128)  # 32 image pixels per latent pixel
    masks[0, :, :64, :] = 1.0             # sample 0: top half
    masks[1, :, :, 96:] = 1.0             # sample 1: last latent column
    gdf = presets.stage_c()
    loss = DiffusionLoss(gdf, lambda fn: None, contextlib.nullcontext)
    pred = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(2)]  # noqa: E731
    total, per_sample = loss(lambda x, r: pred, x0, gens(), pixel_weight=pixel_weights(masks, (4, 4), 0.0))
    # by hand: the same draws, then the plain MSE over the masked latent pixels only
    expected, weights = [], []
    for i, g in enumerate(gens()):
        _n, _e, target, _s, _c, w = gdf.diffuse(x0[i:i + 1], generator=g)
        err = (pred[i:i + 1] - target).pow(2)
        region = err[..., :2, :] if i == 0 else err[..., :, 3:]
        expected.append(region.mean())
        weights.append(w)
    assert torch.allclose(per_sample, torch.stack(expected))
    assert torch.allclose(total, (torch.stack(expected) * torch.cat(weights)).mean())
    # unmasked_weight 1 is the plain loss
    _total, plain = loss(lambda x, r: pred, x0, gens())
    _total, full = loss(lambda x, r: pred, x0, gens(), pixel_weight=pixel_weights(masks, (4, 4), 1.0))
    assert torch.allclose(full, plain)


def test_empty_mask_contributes_nothing():
    err = torch.ones(1, 2, 2, 2)
    assert masked_mean(err, torch.zeros(1, 1, 2, 2)).item() == 0.0


@pytest.mark.parametrize("keys, message", [
    ({"masked_loss": True, "unmasked_weight": 1.5}, "'unmasked_weight' must be in \\[0, 1\\]"),
    ({"unmasked_weight": 0.5}, "apply with masked_loss: true only"),
])
def test_validation(keys, message):
    with pytest.raises(UserError, match=message):
        MaskedLossConfig(**keys).validate_masked_loss()


def test_the_encoder_cache_carries_the_masks(train_assets, tmp_path):
    """tools/cache_dataset.py with masked_loss stores each sample's mask at the latent grid, and the
    cached pipeline gives it back; a cache without masks is refused by a masked run."""
    from tests.helpers.cache_assets import tiny_config
    from tools.cache_dataset import cache_dataset
    from train.stage_c_cache import build_cache_pipeline

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 120
    rgba[:32, :, 3] = 255  # the top half is the subject
    write_tar(str(tmp_path / "s" / "a.tar"), [(f"{i:04d}", {"png": png(rgba, "RGBA"), "txt": b"a cut-out"})
                                              for i in range(2)])
    cfg = tiny_config(train_assets, tmp_path, webdataset_path=str(tmp_path / "s"), masked_loss=True, crop="center",
                      batch_size=2)
    info = cache_dataset(cfg, str(tmp_path / "cache"), batch_size=2, shard_size=2, progress=False)
    assert info["masks"] is True
    with build_cache_pipeline(str(tmp_path / "cache"), batch_size=2, num_workers=0) as pipe:
        batch = next(iter(pipe))
    assert batch["mask"].shape == (2, 1, 2, 2) and batch["mask"][:, 0].tolist() == [[[1.0, 1.0], [0.0, 0.0]]] * 2
    # a masked run on a cache without masks: one clear error before any model loads
    from train.train_c import StageCTrainer

    plain = tiny_config(train_assets, tmp_path, webdataset_path=str(tmp_path / "s"), crop="center")
    cache_dataset(plain, str(tmp_path / "plain"), batch_size=2, shard_size=2, progress=False)
    masked = tiny_config(train_assets, tmp_path, cache_path=str(tmp_path / "plain"), masked_loss=True,
                         experiment_id="m")
    with pytest.raises(UserError, match="holds no masks"):
        StageCTrainer(masked, resume="never").build_pipeline(2, None)


def test_regularization_part_masks_are_fitted_like_its_images():
    from train.regularization import REG_KEY, merge_parts

    batch = {"images": torch.rand(2, 3, 64, 32), "masks": torch.ones(2, 1, 64, 32), "captions": ["a", "b"],
             REG_KEY: {"images": torch.rand(1, 3, 32, 32), "masks": torch.zeros(1, 1, 32, 32), "captions": ["c"]}}
    merged, n_main = merge_parts(batch)
    assert n_main == 2 and merged["masks"].shape == (3, 1, 64, 32) and merged["masks"][2].max() == 0
