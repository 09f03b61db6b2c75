"""The README's demo command, shortened (40 updates) and writing into a temporary folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_and_the_loss_falls(tmp_path):
    proc = subprocess.run([sys.executable, "demo.py", "--updates", "40", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "FELL" in proc.stdout
    run = tmp_path / "checkpoints" / "demo_c"
    for name in ("generator.safetensors", "loss.png", "metrics.jsonl", "latest"):
        assert (run / name).is_file(), name
    assert sorted((tmp_path / "output" / "demo_c").glob("generator_0*.png"))
