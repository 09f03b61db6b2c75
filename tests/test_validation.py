"""Held-out validation (core/validation.py): deterministic figures that equal across resume and
process counts, keep_best files, plots, and a validation loss that falls on held-out demo shards."""
from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from core.validation import ValidationConfig, reduce_rows, timestep_grid
from tests.helpers.adapter_assets import cli_args
from tests.test_train_e2e import C_CONFIG, config_args, subprocess_env
from tests.test_train_distributed import free_port
from tests.helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def val_records(run_dir: Path) -> dict[int, dict]:
    """``{step: {val* key: value}}`` of a run's metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        vals = {k: v for k, v in rec.items() if k.startswith("val")}
        if vals:
            out[int(rec["step"])] = vals
    return out


# -- units ------------------------------------------------------------------------------------
def test_grid_and_reduction_do_not_depend_on_row_order():
    t = timestep_grid()
    assert t.tolist() == [(i + 0.5) / 8 for i in range(8)]
    rng = random.Random(0)
    rows = [(j, p, [rng.random() for _ in t], [rng.random() for _ in t]) for j in range(7) for p in ("val", "val_ema")]
    shuffled = rows[:]
    rng.shuffle(shuffled)
    a, b = reduce_rows(rows, t), reduce_rows(shuffled, t)
    assert a == b  # bitwise: fsum in sample order
    assert a["val_samples"] == 7 and a["val_ema_samples"] == 7
    assert math.isclose(a["val_mse"], sum(sum(r[3]) for r in rows if r[1] == "val") / 56)
    assert sorted(k for k in a if k.startswith("val_mse_t")) == sorted(f"val_mse_t{x:.3f}" for x in t.tolist())


@pytest.mark.parametrize("keys, message", [
    (dict(keep_best=True), "keep_best"),
    (dict(validate_every=5), "validate_every"),
    (dict(validation_webdataset_path="x", validate_every=0), "validate_every"),
    (dict(validation_webdataset_path="x", validation_batches=True), "validation_batches"),
    (dict(validation_webdataset_path=[""]), "validation_webdataset_path"),
])
def test_bad_keys_are_one_line_errors(keys, message):
    with pytest.raises(UserError, match=message):
        ValidationConfig(**keys).validate_validation()


# -- a tiny Stage C run: files, plots, resume ------------------------------------------------------
def _stage_c(assets: Path, root: Path, name: str, **extra) -> Path:
    from train.train_c import StageCTrainer

    settings = dict(experiment_id=name, updates=3, save_every=2, validate_every=1, keep_best=True,
                    validation_webdataset_path=str(assets / "shards"), ema_start_iters=1, ema_iters=1,
                    ema_beta=0.9, generator_dropout=0.0)
    settings.update(extra)
    assert StageCTrainer.main(cli_args(C_CONFIG, assets, root, **settings)) == 0
    return root / "ck" / name


def test_stage_c_validation_files_and_exact_resume(adapter_assets, tmp_path):
    straight = _stage_c(adapter_assets, tmp_path, "straight")
    vals = val_records(straight)
    assert sorted(vals) == [1, 2, 3]
    for rec in vals.values():
        assert rec["val_samples"] == 4 and rec["val_ema_samples"] == 4
        assert all(math.isfinite(v) for v in rec.values())
        assert len([k for k in rec if k.startswith("val_mse_t")]) == 8
    for name in ("generator_best.safetensors", "generator_ema_best.safetensors", "loss.png", "val_timesteps.png"):
        assert (straight / name).is_file(), name
    best = min(vals, key=lambda s: vals[s]["val_loss"])
    saved = json.loads((straight / "state" / "step_00000003" / "validation.json").read_text())
    assert saved["best"] == {"step": best, "val_loss": vals[best]["val_loss"]}

    # stopped after update 2 (its checkpoint), then resumed to 3: the same val* figures, bitwise
    _stage_c(adapter_assets, tmp_path, "resumed", updates=2)
    resumed = _stage_c(adapter_assets, tmp_path, "resumed")
    assert val_records(resumed) == vals


@pytest.mark.parametrize("job", ["lora", "controlnet", pytest.param("stage_b", marks=pytest.mark.slow)])
def test_every_job_validates(adapter_assets, tmp_path, job):
    """LoRA, ControlNet (validation_batches: 1) and Stage B: one update, the validation at the
    end, the best file."""
    import importlib

    from tests.helpers.adapter_assets import STAGE_C_ONLY
    from tests.helpers.golden_runs import JOBS

    module, cls, config, _ = JOBS[job]
    extra = dict(experiment_id=job, updates=1, save_every=1, keep_best=True,
                 validation_webdataset_path=str(adapter_assets / "shards"))
    if job == "controlnet":  # the first global batch of the held-out set only
        extra.update(validation_batches=1)
    if job == "stage_b":
        extra.update(generator_checkpoint_path=None, stage_a_checkpoint_path=str(adapter_assets / "stage_a.safetensors"))
    args = cli_args(str(ROOT / config), adapter_assets, tmp_path, drop=STAGE_C_ONLY if job == "stage_b" else (), **extra)
    assert getattr(importlib.import_module(module), cls).main(args) == 0
    run_dir = tmp_path / "ck" / job
    vals = val_records(run_dir)
    assert list(vals) == [1] and math.isfinite(vals[1]["val_loss"])
    assert vals[1]["val_samples"] == (2 if job == "controlnet" else 4)  # validation_batches=1 x batch_size 2
    best = {"lora": "lora_best.safetensors", "controlnet": "controlnet_best.safetensors",
            "stage_b": "generator_best.safetensors"}[job]
    assert (run_dir / best).is_file()


# -- 2 processes (gloo) against 1 ---------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_give_the_one_process_figures(adapter_assets, tmp_path):
    """The held-out set is split over the ranks and reduced: the same figures as one process,
    bitwise. lr 1e-46 rounds every float32 step to zero, so the weights of update 1 are bitwise the
    initial ones in both runs (the ranks' batches hold other samples than the single process's,
    and any real step would differ in the last bits): only the validation itself is compared."""
    def run(name: str, nproc: int) -> Path:
        args = cli_args(C_CONFIG, adapter_assets, tmp_path, experiment_id=name, updates=1, save_every=1,
                        batch_size=2, lr=1e-46, validation_webdataset_path=str(adapter_assets / "shards"))
        launch = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                        f"--master_port={free_port()}"]
        proc = subprocess.run([sys.executable, *launch, "train/train_c.py", *args], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return tmp_path / "ck" / name

    from tests.helpers.golden_runs import tensor_hashes

    dir_one, dir_two = run("one", 1), run("two", 2)
    assert tensor_hashes(dir_one / "generator.safetensors") == tensor_hashes(dir_two / "generator.safetensors")
    one, two = val_records(dir_one)[1], val_records(dir_two)[1]
    assert one["val_samples"] == 4
    assert one == two, {k: (one[k], two.get(k)) for k in one if one[k] != two.get(k)}


# -- acceptance: the validation loss falls on held-out demo shards -----------------------------------
@pytest.mark.slow
def test_validation_loss_falls_on_held_out_demo_shards(train_assets, tmp_path):
    """The demo photo shards split into a training shard and a held-out shard; a tiny Stage C
    trained from scratch for 240 updates: the held-out loss of the last evaluations is clearly
    below that of the first ones (a trend, not exact values)."""
    from train.train_c import StageCTrainer

    shards = sorted((train_assets / "shards").glob("*.tar"))
    assert len(shards) >= 2
    train_dir, held_dir = tmp_path / "train", tmp_path / "held_out"
    for folder, shard in ((train_dir, shards[0]), (held_dir, shards[-1])):
        folder.mkdir()
        shutil.copy(shard, folder / shard.name)
    started = time.perf_counter()
    args = config_args(C_CONFIG, train_assets, tmp_path, experiment_id="trend", updates=240, save_every=240,
                       batch_size=4, lr=3e-3, warmup_updates=10, webdataset_path=str(train_dir),
                       validation_webdataset_path=str(held_dir), validate_every=40, preview_every=0, log_every=40)
    with torch.random.fork_rng(devices=[]):
        assert StageCTrainer.main(args) == 0
    elapsed = time.perf_counter() - started
    vals = val_records(tmp_path / "ck" / "trend")
    assert sorted(vals) == [40, 80, 120, 160, 200, 240], vals
    curve = [vals[s]["val_loss"] for s in sorted(vals)]
    print(f"validation curve {['%.4f' % v for v in curve]} in {elapsed:.1f} s")
    assert (curve[-1] + curve[-2]) / 2 < 0.9 * (curve[0] + curve[1]) / 2, curve
