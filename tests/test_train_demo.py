"""The CPU demo: its parts (quick), a short end-to-end run of demo.py (a few updates, a few
autoencoder steps), and the README's full command (minutes: marked ``demo``, which pytest.ini
deselects by default; ``python3 -m pytest -m demo tests/test_train_demo.py`` runs it)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_autoencoder_fit_standardises_latents_and_decodes_as_fitted(tmp_path):
    from modules.effnet import imagenet_normalize
    from modules.loading import detect_model_version, load_detected
    from tools.make_demo_assets import make_demo_models, photo_batch

    images = photo_batch(2, 2, 64)  # 64 px -> 2x2 latents, 16x16 previews
    paths, psnr = make_demo_models(tmp_path, images, steps=3)
    assert 0 < psnr < 60
    assert detect_model_version("effnet", paths["effnet"]) == "demo"
    assert detect_model_version("previewer", paths["previewer"]) == "demo"
    effnet, previewer = load_detected("effnet", paths["effnet"]), load_detected("previewer", paths["previewer"])
    with torch.no_grad():
        z = effnet(imagenet_normalize(images))
    assert z.shape == (4, 16, 2, 2) and previewer(z).shape == (4, 3, 16, 16)
    # the final BatchNorm holds the latents' statistics: Stage C sees standardised latents
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (z.var(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_retrieval_and_grid(tmp_path):
    from PIL import Image

    from tools.demo_results import retrieval, write_grid

    g = torch.Generator().manual_seed(0)
    photos = torch.rand(3, 3, 32, 32, generator=g)
    small = torch.nn.functional.interpolate(photos, size=(8, 8), mode="area")
    samples = small[[0, 2, 2]] + 0.01 * torch.randn(3, 3, 8, 8, generator=g)
    assert retrieval(samples, photos) == [0, 2, 2]
    path = write_grid(tmp_path / "grid.png", ["a", "b", "c"], photos, small, samples, [0, 2, 2], cell=16)
    assert Image.open(path).size[1] > 3 * 16


def test_committed_demo_grid_is_small():
    grid = ROOT / "docs" / "demo_grid.png"
    assert grid.is_file() and grid.stat().st_size < 200_000


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's command once (seed fixed by the config): (output folder, stdout)."""
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return out, proc.stdout


@pytest.mark.slow
@pytest.mark.demo
def test_demo_trains_and_writes_its_results(demo_run):
    out, stdout = demo_run
    assert "FELL" in stdout and "PSNR" in stdout
    assert re.search(r"^retrieval: \d+/4$", stdout, re.M), stdout[-1500:]
    # the Previewer's view of a photo is recognisable (17 dB was a brown blur; ~29 dB measured)
    psnr = float(re.search(r"reconstruction PSNR ([\d.]+) dB", stdout).group(1))
    assert psnr >= 25, stdout[-1500:]
    run = out / "checkpoints" / "demo_c"
    for name in ("generator.safetensors", "generator_ema.safetensors", "loss.png", "metrics.jsonl", "latest"):
        assert (run / name).is_file(), name
    assert (out / "output" / "demo_c" / "demo_grid.png").is_file()


@pytest.mark.slow
@pytest.mark.demo
def test_demo_samples_retrieve_their_photos(demo_run):
    """The issue's goal: for at least 3 of the 4 captions the nearest photo of the sample is the
    captioned photo (seed fixed by the config; the default run gives 4/4)."""
    _, stdout = demo_run
    k, n = map(int, re.search(r"^retrieval: (\d+)/(\d+)$", stdout, re.M).groups())
    assert k / n >= 3 / 4, stdout[-1500:]


@pytest.mark.slow
def test_demo_runs_end_to_end_in_short(tmp_path):
    """demo.py end to end with 3 autoencoder steps and 2 updates: every stage runs and reports
    (the learning itself is the full run's test); a second run reuses the assets."""
    cmd = [sys.executable, "demo.py", "--out", str(tmp_path), "--ae-steps", "3", "--updates", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: the loss did not fall in 2 updates
    assert re.search(r"^retrieval: \d+/4$", proc.stdout, re.M), proc.stdout[-1500:]
    assert (tmp_path / "output" / "demo_c" / "demo_grid.png").is_file()
    from tools.make_demo_assets import read_marker

    assert read_marker(tmp_path / "demo_assets")["made_by"] == "demo.py"


def test_asset_tools_never_overwrite_each_others_folders(tmp_path):
    """Issue 26 point 4: tools/make_demo_assets.py refuses the demo's asset folder (and a folder
    no tool marked), and the demo refuses the tiny assets' folder, with one ``error:`` line."""
    from tools.make_demo_assets import claim_folder, write_marker
    from core.errors import UserError

    demo = tmp_path / "runs" / "demo_assets"
    demo.mkdir(parents=True)
    (demo / "previewer.safetensors").write_bytes(b"x")
    write_marker(demo, "demo.py", psnr_db=30.0, steps=2000)
    proc = subprocess.run([sys.executable, "tools/make_demo_assets.py", str(demo)], cwd=ROOT, capture_output=True,
                          text=True, timeout=HANG_S)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "demo.py" in proc.stderr, proc.stderr
    assert (demo / "previewer.safetensors").read_bytes() == b"x"  # untouched
    with pytest.raises(UserError, match="tools/make_demo_assets.py"):
        tiny = tmp_path / "tiny"
        tiny.mkdir()
        write_marker(tiny, "tools/make_demo_assets.py")
        claim_folder(tiny, "demo.py")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x").write_text("mine")
    with pytest.raises(UserError, match="no MADE_BY.json"):
        claim_folder(stray, "tools/make_demo_assets.py")
    claim_folder(tiny, "tools/make_demo_assets.py")  # its own folder: reused
