"""make_shards and inspect on real photos (run as ``python3 -m`` commands)."""
import json
import os
import subprocess
import sys

from core.data import DataConfig, build_pipeline
from tools.photo_shards import make_sample, write_photo_shards
from tests.helpers import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=HANG_S)


def test_make_shards_then_train_read(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        files = make_sample(i, 80, 120)
        (src / f"img.{i:02d}.jpg").write_bytes(files["jpg"])  # dot in the name on purpose
        if i != 3:
            (src / f"img.{i:02d}.txt").write_bytes(files["txt"])
        (src / f"img.{i:02d}.json").write_bytes(files["json"])
    (src / "notes.txt").write_text("no image")
    r = run("core.data.make_shards", str(src), str(tmp_path / "out"), "--shard-size", "3")
    assert r.returncode == 0, r.stderr
    assert "wrote 7 samples into 3 shard(s)" in r.stdout and "1 without caption" in r.stdout
    shards = sorted(os.listdir(tmp_path / "out"))
    assert shards == ["shard-0000.tar", "shard-0001.tar", "shard-0002.tar"]
    pipe = build_pipeline(DataConfig(webdataset_path=str(tmp_path / "out"), image_size=64,
                                     num_workers=0), batch_size=2)
    keys = []
    while True:
        b = next(pipe)
        if b["epoch"]:
            break
        keys += b["keys"]
    assert sorted(keys) == [f"img_{i:02d}" for i in range(7) if i != 3]
    st = pipe.stats()  # (the next epoch may already have started: count >= 1)
    assert list(st["bad"]) == ["missing_caption"] and st["records"][0]["key"] == "img_03"
    pipe.close()
    from core.data.make_shards import main
    assert main([str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2


def test_inspect_config_and_paths(tmp_path, capsys):
    from core.data.inspect import main
    shards = write_photo_shards(str(tmp_path / "s"), 30, 10)
    with open(shards[1], "r+b") as f:  # truncate the middle shard
        f.truncate(os.path.getsize(shards[1]) // 2)
    cfgfile = tmp_path / "train.yaml"
    cfgfile.write_text(
        f"experiment_id: x\nwebdataset_path:\n  - {tmp_path / 's'}\nimage_size: 384\n"
        "multi_aspect_ratio: ['1/1', '1/2', '2/3', '3/4']\n"
        "dataset_filters:\n  - ['aesthetic_score', 'lambda s: s > 4.5']\n")
    out = tmp_path / "report.json"
    r = run("core.data.inspect", str(cfgfile), "--json", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["shards"] == 3 and 20 <= rep["samples"] < 30
    assert 0 < rep["filter_pass_rate"] < 1 and rep["usable"] == round(rep["filter_pass_rate"] * rep["samples"])
    assert rep["bad"] == {"truncated_tar": 1} and rep["bad_samples"][0]["url"] == shards[1]
    assert sum(rep["buckets"].values()) == rep["usable"] and "384x384" in rep["buckets"]
    assert "filter pass rate" in r.stdout and "truncated_tar" in r.stdout
    capsys.readouterr()
    assert main([shards[0], shards[2], "--image-size", "256", "--decode"]) == 0
    text = capsys.readouterr().out
    assert "samples: 20" in text and "256x256" in text
    assert main([str(tmp_path / "missing.tar")]) == 2
    assert "error:" in capsys.readouterr().err
