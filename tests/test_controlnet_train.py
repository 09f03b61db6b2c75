"""End-to-end ControlNet training on CPU: tiny Stage C, real photo shards, Canny / SR / stored control
images; frozen Stage C, official-layout output, exact resume, falling loss."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.adapter_assets import cli_args, losses, overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

CANNY = str(ROOT / "configs/training/tiny_c_controlnet_canny.yaml")
SR = str(ROOT / "configs/training/tiny_c_controlnet_sr.yaml")
COMMON = dict(updates=4, save_every=2, lr=0.1)  # a high lr: 4 updates must visibly overfit


def _trainer(assets, root, config=CANNY, **extra):
    from core.config import load_config
    from core.distributed import init_distributed
    from train.train_c_controlnet import ControlNetConfig, StageCControlNetTrainer

    cfg = load_config(ControlNetConfig, config, overrides(assets, root, **{**COMMON, **extra}))
    return StageCControlNetTrainer(cfg, dist=init_distributed(), resume="auto")


@pytest.fixture(scope="module")
def assets(adapter_assets):
    """This module's name for the shared adapter assets (tests/conftest.py)."""
    return adapter_assets


@torch.no_grad()
def _eval_loss(trainer, controlnet) -> float:
    """Loss on the 4 training images with fixed noise/t; ``controlnet`` None = Stage C alone."""
    from core.data import build_pipeline

    batch = next(iter(build_pipeline(trainer.cfg, batch_size=4, num_workers=0)))
    cond = trainer.get_conditions(batch, is_eval=True)
    if controlnet is not None:
        control, _ = trainer.control_input(batch, torch.Generator().manual_seed(0))
        cond["cnet"] = controlnet(control)
    latents = trainer.encode_latents(batch["images"])
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(8):
        noised, _e, target, _s, noise_cond, _w = trainer.gdf.diffuse(latents, generator=g)
        total += float((trainer.generator(noised, noise_cond, **cond) - target).pow(2).mean())
    return total / 8


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("cnet_straight")
    trainer = _trainer(assets, root, experiment_id="straight", preview_every=4)
    trainer.setup()
    trainer.train()
    trainer.close()
    return trainer, root


def test_controlnet_trains_only_itself_and_saves_the_official_layout(straight, assets):
    from modules.controlnet import ControlNet

    trainer, root = straight
    run = root / "ck" / "straight"
    sd = load_file(run / "controlnet.safetensors")
    reference = ControlNet(c_in=1, c_proj=32, proj_blocks=[0, 2, 5], bottleneck_mode="simple")
    assert set(sd) == set(reference.state_dict())
    reference.load_state_dict(sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("2.weight") and "projections" in k)
    base = load_file(assets / "stage_c_tiny.safetensors")
    for k, v in trainer.generator.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert not trainer.generator.training and not any(p.requires_grad for p in trainer.generator.parameters())
    assert sorted((root / "out" / "straight").glob("controlnet_*.png")), "preview grid with the ControlNet"
    assert sorted((root / "out" / "straight").glob("control_*.png")), "preview of the control inputs"


def test_controlnet_loss_falls_on_the_overfitting_set(straight):
    trainer, _ = straight
    before = _eval_loss(trainer, None)  # == a fresh ControlNet (zero-initialised projections)
    after = _eval_loss(trainer, trainer.unwrapped("controlnet").eval())
    assert after < before * 0.97, (before, after)


def test_controlnet_resume_is_exact(straight, assets, tmp_path):
    from train.train_c_controlnet import StageCControlNetTrainer

    _, root = straight
    args = cli_args(CANNY, assets, tmp_path, experiment_id="straight", **{**COMMON, "updates": 2})
    assert StageCControlNetTrainer.main(args) == 0
    args = cli_args(CANNY, assets, tmp_path, experiment_id="straight", **COMMON)
    assert StageCControlNetTrainer.main(args) == 0
    a, b = root / "ck" / "straight", tmp_path / "ck" / "straight"
    la, lb = losses(a), losses(b)
    assert [la[s] for s in (3, 4)] == [lb[s] for s in (3, 4)]
    wa, wb = load_file(a / "controlnet.safetensors"), load_file(b / "controlnet.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_stored_control_images_and_sr_filter_with_the_loaded_effnet(assets, tmp_path):
    trainer = _trainer(assets, tmp_path, experiment_id="stored", control_image_key="control.png", crop="center",
                       updates=1, save_every=1)
    trainer.setup()
    batch = trainer.batches.next()
    control, _ = trainer.control_input(batch, torch.Generator())
    assert control.shape == (2, 1, 64, 64)
    assert set(control.unique().tolist()) <= {0.0, 1.0} and 0 < control.mean() < 0.5  # the stored Canny edges
    trainer.train()
    trainer.close()
    assert (tmp_path / "ck" / "stored" / "controlnet.safetensors").is_file()

    sr = _trainer(assets, tmp_path, config=SR, experiment_id="sr")
    sr.build_models()
    assert sr.cnet_filter.effnet is sr.effnet and sr.controlnet.c_in == 16
    control, preview = sr.control_input({"images": batch["images"]}, torch.Generator())
    assert control.shape == (2, 16, 2, 2) and preview.shape == batch["images"].shape


def test_controlnet_config_errors_are_one_line(assets, tmp_path, capsys):
    from core.errors import run_cli
    from train.train_c_controlnet import StageCControlNetTrainer

    for extra, needle in ((dict(controlnet_blocks=[0, 9]), "exceed the 6 ResBlock calls"),
                          (dict(controlnet_filter="CannyFliter"), "unknown controlnet_filter"),
                          (dict(controlnet_filter_params={"resize": 64, "size": 3}), "unknown parameter"),
                          (dict(control_image_key="control.png"), "crop: center")):
        with pytest.raises(SystemExit) as exc:
            run_cli(StageCControlNetTrainer.main, cli_args(CANNY, assets, tmp_path, experiment_id="bad", **extra))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        # Earlier lines are the run's log; exit code 2 means run_cli caught a UserError (a crash exits 1).
        last = err.splitlines()[-1]
        assert last.startswith("error: ") and needle in last, err


def test_projection_width_follows_the_stage_c_version_and_effnet_backbone_init():
    from modules.controlnet import ControlNet
    from modules.effnet import EfficientNetEncoder
    from modules.registry import build_model
    from train.train_c_controlnet import controlnet_c_proj, init_backbone_from_effnet

    assert controlnet_c_proj(build_model("stage_c", "1B", device="meta")) == 1536
    assert controlnet_c_proj(build_model("stage_c", "3.6B", device="meta")) == 2048
    torch.manual_seed(0)
    effnet = EfficientNetEncoder().eval()
    cnet = ControlNet(c_in=4, c_proj=32, proj_blocks=[0], bottleneck_mode="effnet")
    init_backbone_from_effnet(cnet, effnet)
    src, dst = effnet.backbone.state_dict(), cnet.backbone.state_dict()
    assert torch.equal(dst["0.0.weight"][:, :3], src["0.0.weight"]) and not dst["0.0.weight"][:, 3].any()
    assert all(torch.equal(dst[k], src[k]) for k in src if k != "0.0.weight")
    cnet.train()
    stats = cnet.backbone[0][1].running_mean.clone()
    cnet(torch.rand(1, 4, 64, 64))
    assert not cnet.backbone.training and torch.equal(cnet.backbone[0][1].running_mean, stats)


def test_identity_filter_without_a_face_model_is_a_clear_error(assets, tmp_path):
    from core.errors import UserError

    trainer = _trainer(assets, tmp_path, experiment_id="identity", controlnet_filter="IdentityFilter",
                       controlnet_filter_params={"face_model": "no_such_package.faces:Model"})
    trainer.build_models()
    assert trainer.controlnet.c_in == 512
    images = torch.rand(1, 3, 64, 64)
    with pytest.raises(UserError, match="controlnet_filter IdentityFilter"):
        trainer.control_input({"images": images}, torch.Generator())
