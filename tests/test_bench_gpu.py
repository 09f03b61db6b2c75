"""bench/gpu.py: the FLOP count against an analytic count, the peak table, OOM / timeout rows as
results, and ``--quick`` (the same code path as on a GPU, tiny sizes, CPU) printing the table."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from tests.helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_flop_count_matches_the_analytic_count(gpu):
    b, i, h, o = 3, 8, 16, 4

    def build():
        return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o)), torch.empty(b, i)

    got = gpu.count_flops(build, lambda built: built[0](built[1]).pow(2).mean())
    forward = 2 * b * i * h + 2 * b * h * o
    # backward: both weight gradients, the input gradient of the second layer only (the batch
    # itself needs none)
    backward = 2 * b * i * h + 2 * b * h * o + 2 * b * h * o
    assert got == forward + backward

    def build_frozen_first():
        net, x = build()
        net[0].requires_grad_(False)  # a frozen base layer: no weight gradient, no input gradient
        return net, x

    assert gpu.count_flops(build_frozen_first, lambda built: built[0](built[1]).sum()) == forward + 2 * b * h * o


def test_peak_table_by_device_name(gpu):
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("Some Future GPU") is None


def test_oom_and_timeout_are_row_results(gpu, monkeypatch):
    row = gpu.quick_row(gpu.ROWS[0])

    def oom(*_a, **_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu, "build_encoders", oom)  # the forked row sees the patched module
    monkeypatch.setattr(gpu, "model_flops", lambda row, batch: 1000 * batch)
    monkeypatch.setattr(gpu, "memory_estimate", lambda row, batch: 12.5)
    r = gpu.run_isolated(row, True, 0, 1, 60)
    assert r["status"] == "OOM" and r["where"] == "building the networks"
    assert r["estimate_gib"] == 12.5  # the estimate stands beside an OOM too

    monkeypatch.setattr(gpu, "run_row", lambda *a, **k: __import__("time").sleep(30))
    r = gpu.run_isolated(row, True, 0, 1, 1)
    assert r["status"] == "timeout"

    table = gpu.markdown_table([r, {"row": "x", "title": "t", "status": "ok", "batch": 2, "step_s": 0.5,
                                    "images_per_s": 4.0, "tflops_per_s": 100.0, "mfu": 0.25,
                                    "peak_allocated_gib": 10.0, "estimate_gib": 11.0}])
    assert "timeout (no result within 1 s)" in table and "| 25.0 % |" in table


def test_quick_prints_the_table(tmp_path):
    out = tmp_path / "gpu.json"
    rows = ["c36_lora_ckpt", "c36_full_max"]  # every row: bench/gpu.py --quick (about a minute)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick", "--only", *rows,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ["PYTHONPATH"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(x for x in lines if x.startswith("| row"))
    for column in ("peak alloc GiB", "estimate GiB", "step s", "images/s", "TFLOP/s", "MFU"):
        assert column in header
    assert "MFU not reported" in proc.stdout  # CPU: no bf16 peak
    data = json.loads(out.read_text())
    got = {r["row"]: r for r in data["rows"]}
    assert list(got) == rows and all(r["status"] == "ok" for r in got.values()), got
    for r in got.values():
        assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["model_flops_per_step"] > 0
        assert r["peak_allocated_gib"] > 0 and r["estimate_gib"] > 0 and r["mfu"] is None
    assert got["c36_full_max"]["batch"] == 4  # the batch search doubled 1 -> 2 -> 4 (capped in --quick)


def test_simulation_table_and_json_fields(gpu):
    ok = {"row": "preset:x", "name": "preset:x", "title": "t", "status": "ok", "batch_size": 4,
          "simulated_peak_gib": 7.2, "peak_phase": "backward", "estimate_gib": 7.0, "estimate_error_pct": -2.8,
          "budget_gib": 8.0, "limit_gib": 6.5, "fits": False,
          "breakdown_gib": {"weights": 3.6, "gradients": 0.0, "optimizer states": 0.02, "activations": 3.0,
                            "temporaries": 0.6}}
    table = gpu.simulation_table([ok, {"row": "y", "title": "u", "status": "timeout", "error": "no result"}])
    assert "| preset:x: t | 4 | 7.20 | backward | 3.60 |" in table and "-2.8 %" in table
    assert "NO (> 6.5)" in table and "timeout (no result)" in table
    # every preset is a row named preset:<stem>, with its budget
    presets = [r for r in gpu.preset_rows() if r.name == "preset:lora_c_3b_8gb"]
    assert presets and presets[0].budget_gib == 8 and presets[0].mode == "lora"
