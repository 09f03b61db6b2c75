"""Tiny Stage C training from the sources users have (issue 15): shards over http:// from a real
server on 127.0.0.1, a plain folder of images + captions, and wandb for real (offline mode): the
offline run holds the config, the scalar metrics and the previews, and a resumed run continues
the same run id."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.helpers.http_server import FileServer
from tests.helpers.wandb_records import summary
from tests.test_train_e2e import C_CONFIG, config_args, losses, train_c

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stage_c_trains_from_http_shards_with_wandb_offline(train_assets, tmp_path, monkeypatch):
    import wandb  # the real package (requirements-dev.txt): an ImportError here, not a skip
    assert wandb.__version__
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    shards = sorted(p.name for p in (train_assets / "shards").glob("*.tar"))
    assert shards == ["demo-000000.tar", "demo-000001.tar"]
    with FileServer(str(train_assets / "shards"), drop_after=20000, drops=1) as server:
        args = config_args(C_CONFIG, train_assets, tmp_path, experiment_id="http", save_every=2,
                           webdataset_path=f"{server.url}/demo-{{000000..000001}}.tar",
                           wandb_project="cascade-tests")
        assert train_c([*args, "--set", "updates=2"]) == 0
        assert train_c([*args, "--set", "updates=4"]) == 0    # resumes at update 2
        assert server.dropped == 1 and any(h.get("Range") for _, h in server.requests)
    run = tmp_path / "ck" / "http"
    assert set(losses(run)) == {1, 2, 3, 4}
    run_id = json.loads((run / "state" / "step_00000004" / "trainer.json").read_text())["wandb_run_id"]
    folders = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith("-" + run_id) for f in folders)
    first, resumed = (summary(next(f.glob("run-*.wandb"))) for f in folders)
    assert first["run_id"] == resumed["run_id"] == run_id
    assert first["config"]["experiment_id"] == "http" and first["config"]["lr"] == 1e-3
    assert first["config"]["webdataset_path"].startswith("http://127.0.0.1:")
    steps = {r["_step"]: r for r in first["history"] + resumed["history"]}
    assert {1, 2, 3, 4} <= set(steps) and all("loss" in steps[s] for s in (1, 2, 3, 4))
    assert steps[4]["loss"] == pytest.approx(losses(run)[4])
    for s in (2, 4):   # previews at every save and at the end, as image files in the run
        assert steps[s]["generator/_type"] == "image-file"
    for got, folder in ((first, folders[0]), (resumed, folders[1])):
        assert got["media"] and all((folder / "files" / m).is_file() for m in got["media"])


def test_stage_c_trains_from_a_plain_image_folder(train_assets, tmp_path):
    folder = tmp_path / "photos"
    for shard in sorted((train_assets / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:   # the layout most LoRA users have: NNNN.jpg + NNNN.txt
            tf.extractall(folder / shard.stem, filter="data")
    assert not list(folder.rglob("*.tar")) and list(folder.rglob("*.txt"))
    args = config_args(C_CONFIG, train_assets, tmp_path, experiment_id="folder", updates=4,
                       save_every=4, webdataset_path=str(folder))
    assert train_c(args) == 0
    run = tmp_path / "ck" / "folder"
    assert set(losses(run)) == {1, 2, 3, 4}
    data = json.loads((run / "state" / "step_00000004" / "data.json").read_text())
    assert data["ranks"][0] is not None
    assert Path(run / "generator.safetensors").is_file()
