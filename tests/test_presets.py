"""The presets by card size (configs/training/*_<N>gb.yaml): each names its job and budget in its
header, states its simulated peak, and that peak fits the card (budget - 1.5 GiB for the CUDA
context and allocator slack). The simulations themselves (15-25 s each at full size on an idle
core) are marked ``fullsize``: the default suite checks the headers and the rows, and .ci/run then
runs ``-m fullsize``."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from train.bench_step import PRESET_BUDGET, preset_rows

ROOT = Path(__file__).resolve().parents[1]
SLACK_GIB = 1.5
#: what issue 24 asks for: LoRA for 8/12/16/24 GB, full finetune for 24/80 GB, ControlNet 16/24 GB, Stage B 24 GB
WANTED = {"lora_c_3b_8gb", "lora_c_3b_12gb", "lora_c_3b_16gb", "lora_c_3b_24gb", "full_c_3b_24gb",
          "full_c_3b_80gb", "controlnet_c_3b_canny_16gb", "controlnet_c_3b_canny_24gb", "full_b_3b_24gb"}
STATED = re.compile(r"^#\s*simulated peak:\s*([0-9.]+) GiB", re.M)


@pytest.fixture(scope="module")
def rows():
    return {r.name.removeprefix("preset:"): r for r in preset_rows()}


def test_every_card_size_has_a_preset_whose_stated_peak_fits(rows):
    assert set(rows) >= WANTED
    for stem, row in rows.items():
        text = (ROOT / "configs" / "training" / f"{stem}.yaml").read_text()
        budget = float(PRESET_BUDGET.search(text).group(1))
        stated = STATED.search(text)
        assert stated, f"{stem}: the header states no simulated peak"
        assert float(stated.group(1)) <= budget - SLACK_GIB, stem
        assert row.budget_gib == budget and row.image_size == 1024, stem
        assert f"--only preset:{stem}" in text


@pytest.mark.slow
@pytest.mark.fullsize  # ~15-25 s each: run by .ci/run after the suite (python3 -m pytest -n 2 -m fullsize tests)
@pytest.mark.parametrize("stem", sorted(WANTED))
def test_preset_simulates_within_its_budget(stem, rows):
    from train.bench_step import simulate_row

    row = rows[stem]
    sim = simulate_row(row)
    assert sim.peak_gib <= row.budget_gib - SLACK_GIB, f"{stem}: simulated {sim.peak_gib:.2f} GiB"
    text = (ROOT / "configs" / "training" / f"{stem}.yaml").read_text()
    assert abs(float(STATED.search(text).group(1)) - sim.peak_gib) < 0.1, f"{stem}: header out of date"
