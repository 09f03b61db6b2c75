"""Acceptance of issue 19: a tiny LoRA trains 3 updates with every LoRA-user feature enabled
together (tag captions, regularization images, min-SNR loss weighting, Prodigy, DoRA) and resumes
exactly. ``FEATURES`` is the one place to add a key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.adapter_assets import cli_args, losses

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = str(ROOT / "configs/training/tiny_c_lora.yaml")
#: every feature of the LoRA pack at once (the regularization path is added per test)
FEATURES = dict(caption_tag_shuffle=True, caption_keep_tags=1, caption_tag_dropout=0.3,
                regularization_share=0.5, regularization_weight=0.5,
                loss_weighting="min_snr", min_snr_gamma=4.0, optimizer="prodigy", lr=1.0,
                lora_type="dora")
COMMON = dict(updates=3, save_every=1, batch_size=4, rank=2, train_tokens=[["[tinytok]", "^dog</w>"]], **FEATURES)
REG_CAPTIONS = ("a photo, a cat, indoors", "a photo, a cup, on a table", "a photo, a rocket, outdoors",
                "a photo, a person, smiling")


def _reg_shards(base: Path) -> Path:
    """A real shard of 4 class photos with tag captions (other crops than the training set)."""
    from core.data.tarwrite import write_tar
    from tools.photo_shards import jpeg_bytes, photo_variant

    folder = base / "reg_shards"
    samples = [(f"r{i:03d}", {"jpg": jpeg_bytes(photo_variant(i + 1, 64, 64, seed=7), 90), "txt": c.encode()})
               for i, c in enumerate(REG_CAPTIONS)]
    write_tar(str(folder / "reg-0000.tar"), samples)
    return folder


def test_all_features_train_three_updates_and_resume_exactly(adapter_assets, tmp_path):
    from train.train_c_lora import StageCLoraTrainer

    reg = str(_reg_shards(tmp_path))
    extra = dict(COMMON, regularization_webdataset_path=reg)
    straight = tmp_path / "a"
    assert StageCLoraTrainer.main(cli_args(CONFIG, adapter_assets, straight, experiment_id="all", **extra)) == 0
    resumed = tmp_path / "b"
    assert StageCLoraTrainer.main(cli_args(CONFIG, adapter_assets, resumed, experiment_id="all",
                                           **{**extra, "updates": 1})) == 0
    assert StageCLoraTrainer.main(cli_args(CONFIG, adapter_assets, resumed, experiment_id="all", **extra)) == 0
    run_a, run_b = straight / "ck" / "all", resumed / "ck" / "all"
    la, lb = losses(run_a), losses(run_b)
    assert sorted(la) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in la.values())
    assert [la[s] for s in (2, 3)] == [lb[s] for s in (2, 3)]
    a, b = load_file(run_a / "lora.safetensors"), load_file(run_b / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the LoRA moved (Prodigy stepped), the regularization part was logged, both data positions saved
    first = load_file(sorted((run_a / "state").glob("step_*"))[0] / "lora.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a)
    records = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    assert any("reg_raw_loss" in r for r in records)
    state = json.loads(next(iter(sorted((run_a / "state").glob("step_*"))))
                       .joinpath("data.json").read_text())
    assert set(state["ranks"][0]) == {"main", "regularization"}
    opt = torch.load(sorted((run_a / "state").glob("step_*"))[-1] / "optimizer.pt", weights_only=False)
    assert opt["param_groups"][0]["d"] > 0  # Prodigy's step-size estimate is saved (and so resumed)
