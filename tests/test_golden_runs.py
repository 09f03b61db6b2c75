"""Behaviour is pinned: a short tiny run of each job gives the recorded per-update losses and final
weights bit for bit (tests/data/golden_runs.json, recorded before the core redesign, one record per
kind of CPU: see tests/helpers/golden_runs.py for why)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers.golden_runs import JOBS, cpu_signature, run_job

RECORDS = json.loads((Path(__file__).parent / "data" / "golden_runs.json").read_text())["by_cpu"]


@pytest.mark.parametrize("job", sorted(JOBS))
def test_tiny_run_is_bitwise_the_recorded_one(job, adapter_assets, tmp_path):
    result = run_job(job, adapter_assets, tmp_path)
    record = RECORDS.get(cpu_signature())
    if record is not None:
        assert result["losses"] == record[job]["losses"]
        assert result["files"] == record[job]["files"]
        return
    # a CPU kind without a record: the same losses up to the last bits of float32 kernels
    for name, other in RECORDS.items():
        assert result["losses"].keys() == other[job]["losses"].keys(), name
        for step, loss in result["losses"].items():
            assert math.isclose(loss, other[job]["losses"][step], rel_tol=1e-5), (name, step)
