"""Behaviour is pinned: a short tiny run of each job gives the recorded per-update losses and final
weights bit for bit (tests/data/golden_runs.json, recorded before the core redesign)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.golden_runs import JOBS, run_job

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_runs.json").read_text())


@pytest.mark.parametrize("job", sorted(JOBS))
def test_tiny_run_is_bitwise_the_recorded_one(job, adapter_assets, tmp_path):
    result = run_job(job, adapter_assets, tmp_path)
    assert result["losses"] == GOLDEN[job]["losses"]
    assert result["files"] == GOLDEN[job]["files"]
