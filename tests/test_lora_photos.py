"""Issue 26 point 5: the CPU recipe "LoRA on a folder of your own photos" (tools/lora_photos.py)
runs end to end and reports what it learned (a few steps here; the figures of a default run are
in the README)."""
from __future__ import annotations

import json
import re
import shutil

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_recipe_runs_end_to_end_on_a_photo_folder(tmp_path, capsys):
    from tools.lora_photos import main
    from tools.photo_shards import photo_dir

    photos = tmp_path / "my photos"
    photos.mkdir()
    for name in ("motorcycle_left.png", "motorcycle_right.png"):
        shutil.copy(f"{photo_dir()}/{name}", photos / name)
    out = tmp_path / "run"
    args = [str(photos), "--out", str(out), "--ae-steps", "2", "--base-updates", "2", "--lora-updates", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert re.search(r"^concept: base \d/4, base \+ LoRA \d/4", text, re.M), text[-2000:]
    assert (out / "lora_grid.png").is_file() and (out / "checkpoints" / "lora" / "lora.safetensors").is_file()
    assert set(json.loads((out / "result.json").read_text())) >= {"concept_base", "concept_lora", "psnr_db"}


def test_recipe_refuses_a_folder_without_photos_and_a_bad_token(tmp_path):
    from core.errors import UserError
    from tools.lora_photos import main

    with pytest.raises(UserError, match="no photos"):
        main([str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="new token"):
        main([str(tmp_path), "--token", "mytok", "--out", str(tmp_path / "o")])
