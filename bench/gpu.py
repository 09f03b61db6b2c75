"""GPU benchmark of the headline training jobs: one prepared command for a short GPU loan.

    python3 bench/gpu.py [--only NAME ...] [--steps 5] [--row-timeout 90] [--out gpu.json]
    python3 bench/gpu.py --quick          # the same code path, tiny sizes, on CPU (the test suite)
    python3 bench/gpu.py --list

Every row is a training step of one job with FULL-SIZE, randomly initialised networks (built from
``modules.registry``; CLIP text bigG-14 and vision ViT-L/14 from their published configurations
typed in below, random weights; nothing is downloaded or read): the frozen encoders run their
no-grad forward (CLIP text + vision and EfficientNet for Stage C; CLIP text, EfficientNet and
Stage A for Stage B), then ``gdf.diffuse``, the trained forward under bf16 autocast, the loss of
``train/diffusion_loss.py``, backward and the optimizer step (``core.optim``). Data loading is not
part of it (``bench/data_throughput.py`` measures that).

Per row: peak allocated and reserved memory (``torch.cuda.max_memory_*``; peak RSS on CPU), median
step time after ``--warmup`` steps, images/s, model TFLOP/s and MFU, and the analytic estimate that
``--dry-run`` prints for the same run (``core.memory`` on ``train/memory_specs.py``) beside the
measured peak. FLOPs are the trained networks' forward + backward counted by
``torch.utils.flop_counter.FlopCounterMode`` on fake tensors for one sample, times the batch
(every operation of these networks is per sample; no memory needed; without the recomputation
of gradient checkpointing, i.e. model FLOPs, not hardware FLOPs; the encoders' no-grad forwards
are not counted). MFU = FLOP/s / the device's dense bf16 peak from :data:`PEAK_BF16_TFLOPS` by
device name; an unknown device gets no MFU (the table says so; ``--peak-tflops`` sets it).

Each row runs in its own process (forked; the parent never touches CUDA) with a wall-clock limit
(``--row-timeout``): an out-of-memory error is a row result (``OOM``), a row past its limit is
``timeout``, a crash is ``error`` with its last line; the table is always printed. A ``max`` row
doubles the batch from its start until a step runs out of memory (or the row's time is spent) and
reports the largest batch that ran. Prints a markdown table; ``--out`` writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import nn

# the step itself (one code path for the GPU run and the simulation)
from train.bench_step import (Row, build_encoders, build_trained,  # noqa: F401
                              controlnet_kwargs, make_optimizer, preset_rows, trained_loss, train_forward,
                              training_step)

GIB = 2**30
#: what a card needs besides the allocated peak: CUDA context and allocator slack (GiB)
BUDGET_SLACK_GIB = 1.5

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a substring of
#: ``torch.cuda.get_device_name()``; first match wins, so longer names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("RTX 6000 Ada", 364.0), ("A6000", 155.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0),
    ("5090", 209.5), ("4090", 165.2), ("4080", 97.5), ("3090", 71.0), ("3080", 59.5),
    ("V100", 125.0), ("T4", 65.0),
]

ROWS: list[Row] = [
    Row("c36_lora", "Stage C 3.6B LoRA r4 .attn", "stage_c", "3.6B", "lora"),
    Row("c36_lora_ckpt", "Stage C 3.6B LoRA r4 .attn, grad ckpt", "stage_c", "3.6B", "lora", checkpointing=True),
    Row("c36_full_b1", "Stage C 3.6B full, bf16 + Adafactor, grad ckpt", "stage_c", "3.6B", batch=1,
        checkpointing=True, weight_dtype="bfloat16", optimizer="adafactor"),
    Row("c36_full_max", "Stage C 3.6B full, bf16 + Adafactor, grad ckpt, largest batch", "stage_c", "3.6B", batch=1,
        checkpointing=True, weight_dtype="bfloat16", optimizer="adafactor", search_max_batch=True),
    Row("c36_full_sr_b1", "Stage C 3.6B full, bf16 + AdamW stochastic rounding, grad ckpt", "stage_c", "3.6B",
        batch=1, checkpointing=True, weight_dtype="bfloat16", optimizer="adamw", stochastic_rounding=True),
    Row("c1b_full", "Stage C 1B full, bf16 + Adafactor", "stage_c", "1B", weight_dtype="bfloat16",
        optimizer="adafactor"),
    Row("c36_controlnet", "ControlNet canny on Stage C 3.6B, grad ckpt", "stage_c", "3.6B", "controlnet",
        checkpointing=True),
    Row("b3b_full", "Stage B 3B full, bf16 + Adafactor, grad ckpt", "stage_b", "3B", checkpointing=True,
        weight_dtype="bfloat16", optimizer="adafactor"),
    # the low-VRAM goals of issue 24 (bench/README.md)
    Row("c36_lora_int8", "Stage C 3.6B LoRA r4 .attn, int8 base, grad ckpt, cached", "stage_c", "3.6B", "lora",
        checkpointing=True, base_dtype="int8", cached=True),
    Row("c36_lora_lowvram", "Stage C 3.6B LoRA r4 .attn, int8 base, grad ckpt, offload 2 blocks, cached", "stage_c",
        "3.6B", "lora", checkpointing=True, base_dtype="int8", offload_blocks=2, cached=True),
    Row("c36_lora_offload_b1", "Stage C 3.6B LoRA r4 .attn, int8 base, grad ckpt, offload 2 blocks, cached",
        "stage_c", "3.6B", "lora", batch=1, checkpointing=True, base_dtype="int8", offload_blocks=2, cached=True),
    Row("c36_full_fused_b1", "Stage C 3.6B full, bf16 + Adafactor, fused backward, grad ckpt", "stage_c", "3.6B",
        batch=1, checkpointing=True, weight_dtype="bfloat16", optimizer="adafactor", fused_backward=True,
        grad_clip=None),
    Row("c36_controlnet_int8_offload", "ControlNet canny on Stage C 3.6B, int8 base, offload 2 blocks, grad ckpt",
        "stage_c", "3.6B", "controlnet", checkpointing=True, base_dtype="int8", offload_blocks=2),
]


def quick_row(row: Row) -> Row:
    """The row at test size (tiny networks, 64 px, batch <= 2) for ``--quick``."""
    return replace(row, version="tiny", image_size=64, batch=min(row.batch, 2),
                   title=row.title.replace(row.version, "tiny", 1))


# ------------------------------------------------------------------------------------------------
# FLOPs, estimate, device
# ------------------------------------------------------------------------------------------------
def count_flops(build: Callable[[], Any], step: Callable[[Any], torch.Tensor]) -> int:
    """FLOPs of ``step(build())`` and its backward, counted by ``FlopCounterMode`` on fake tensors
    (shapes only: full-size networks cost no memory and little time)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        built = build()
        counter = FlopCounterMode(display=False)
        with counter:
            loss = step(built)
            loss.backward()
    return int(counter.get_total_flops())


def model_flops(row: Row, batch: int) -> int:
    """Forward + backward FLOPs of the trained networks at ``batch`` (no recomputation counted)."""
    r = replace(row, batch=batch, checkpointing=False)
    cpu = torch.device("cpu")

    def build():
        nets, _ = build_trained(r, None)
        x0, cond = _fake_inputs(r)
        images = torch.empty(batch, 3, r.image_size, r.image_size) if r.mode == "controlnet" else None
        return nets, x0, cond, images

    # the same networks and forward as the timed step; the noising (gdf.diffuse draws Python
    # numbers from its tensors, which fake tensors do not hold) is elementwise and not counted
    return count_flops(build, lambda b: trained_loss(r, b[0], b[1], torch.empty(batch), b[2], b[3], cpu))


def _fake_inputs(row: Row) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from modules.registry import model_config

    kw, b, s = model_config(row.kind, row.version), row.batch, row.image_size
    if row.kind == "stage_c":
        return torch.empty(b, kw.get("c_in", 16), s // 32, s // 32), {
            "clip_text": torch.empty(b, 77, kw.get("c_clip_text", 1280)),
            "clip_text_pooled": torch.empty(b, 1, kw.get("c_clip_text_pooled", 1280)),
            "clip_img": torch.empty(b, 1, kw.get("c_clip_img", 768))}
    return torch.empty(b, kw.get("c_in", 4), s // 4, s // 4), {
        "effnet": torch.empty(b, kw.get("c_effnet", 16), s * 3 // 4 // 32, s * 3 // 4 // 32),
        "clip": torch.empty(b, 1, kw.get("c_clip", 1280))}


def memory_estimate(row: Row, batch: int) -> Optional[float]:
    """The ``--dry-run`` estimate (GiB, one rank) of this run at ``batch``."""
    from types import SimpleNamespace

    from core.memory import estimate_memory
    from train.memory_specs import controlnet_spec, lora_spec, stage_b_spec, stage_c_spec

    cfg = SimpleNamespace(model_version=row.version, batch_size=batch, image_size=row.image_size,
                          optimizer=row.optimizer, dtype=row.weight_dtype if row.mode == "full" else None,
                          frozen_dtype="bfloat16", precision="auto", cache_path="cache" if row.cached else None,
                          rank=row.lora_rank, module_filters=list(row.lora_filters), grad_accum_steps=1,
                          use_fsdp=False, gradient_checkpointing=row.checkpointing,
                          stochastic_rounding=row.stochastic_rounding, base_dtype=row.base_dtype,
                          base_quant_block=row.base_quant_block, offload_blocks=row.offload_blocks,
                          fused_backward=row.fused_backward)
    if row.mode == "lora":
        spec = lora_spec(cfg)
    elif row.mode == "controlnet":
        kw = {k: v for k, v in controlnet_kwargs(row).items() if k != "c_proj"}  # the spec sets c_proj
        spec = controlnet_spec(cfg, controlnet=kw)
    else:
        spec = (stage_b_spec if row.kind == "stage_b" else stage_c_spec)(cfg)
    est = estimate_memory(spec)
    return est["total_checkpointed" if row.checkpointing else "total"] / GIB


#: folder shared by the rows of one invocation: FLOP counts and estimates of equal runs are reused
#: (rows that differ only in checkpointing or name count the same model FLOPs)
_SHARED: dict[str, Optional[str]] = {"dir": None}


def _shared(what: str, row: Row, batch: int, compute: Callable[[], Any]) -> Any:
    """``compute()``, or its value from an earlier row of this invocation with the same run."""
    skip = {"name", "title", "search_max_batch"} | ({"checkpointing"} if what == "flops" else set())
    key = json.dumps([what, batch, {k: v for k, v in sorted(asdict(row).items()) if k not in skip}])
    folder = _SHARED["dir"]
    path = os.path.join(folder, f"{what}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json") if folder else None
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            got = json.load(fh)
        if got["key"] == key:
            return got["value"]
    value = compute()
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"key": key, "value": value}, fh)
    return value


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a device by name, None when it is not in the table."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _peak_memory(device: torch.device) -> tuple[Optional[float], Optional[float]]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, None


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or "can't allocate" in text
                                                             or isinstance(exc, MemoryError))


# ------------------------------------------------------------------------------------------------
# one row, in its own process
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_steps(row: Row, nets: nn.ModuleDict, params: list, opt: torch.optim.Optimizer,
                  enc: dict[str, nn.Module], device: torch.device, batch: int, warmup: int, steps: int,
                  deadline: float) -> list[float]:
    """Step times (s) of ``steps`` timed steps after ``warmup`` (stops early at ``deadline``)."""
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(warmup + steps):
        images = torch.rand(batch, 3, row.image_size, row.image_size, device=device, generator=gen)
        _sync(device)
        t0 = time.perf_counter()
        training_step(row, nets, params, opt, enc, images, device)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and times:
            break
    return times


def run_row(row: Row, quick: bool, warmup: int, steps: int, budget_s: float) -> dict:
    """Measure one row in this process; an out-of-memory error is a result."""
    started = time.perf_counter()
    # before any step, so an OOM row shows them too (FLOPs are linear in the batch: counted for one sample)
    one = replace(row, batch=1)
    flops_per_sample = _shared("flops", one, 1, lambda: model_flops(one, 1))
    # (the batch search estimates the batch it ends at, afterwards)
    estimate = None if row.search_max_batch else _shared("estimate", row, row.batch,
                                                           lambda: memory_estimate(row, row.batch))
    left = budget_s - (time.perf_counter() - started)
    # the batch search keeps time for the estimate of the batch it ends at
    deadline = time.perf_counter() + (0.6 if row.search_max_batch else 0.8) * left
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result: dict[str, Any] = {"row": row.name, "title": row.title, "device": _device_name(device),
                              "batch": row.batch, "image_size": row.image_size, "status": "ok",
                              "estimate_gib": estimate}
    torch.manual_seed(0)
    try:
        enc = build_encoders(row, device, quick)
        nets, params = build_trained(row, device)
        opt = make_optimizer(row, params)
    except BaseException as exc:  # noqa: BLE001 - an OOM while building is a result too
        if not _is_oom(exc):
            raise
        result.update(status="OOM", where="building the networks")
        return result
    batch, best = row.batch, None
    while True:
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = measure_steps(row, nets, params, opt, enc, device, batch, warmup, steps, deadline)
            peak, reserved = _peak_memory(device)
            best = {"batch": batch, "step_s": statistics.median(times), "steps": len(times),
                    "peak_allocated_gib": peak, "peak_reserved_gib": reserved}
        except BaseException as exc:  # noqa: BLE001
            if not _is_oom(exc):
                raise
            opt.zero_grad(set_to_none=True)
            if best is None:
                peak, reserved = _peak_memory(device)
                result.update(status="OOM", where=f"step at batch {batch}", peak_allocated_gib=peak,
                              peak_reserved_gib=reserved,
                              estimate_gib=estimate if estimate is not None else memory_estimate(row, batch))
                return result
            result["stopped_by"] = f"OOM at batch {batch}"
            break
        if not row.search_max_batch:
            break
        if time.perf_counter() > deadline:
            result["stopped_by"] = "time limit"
            break
        batch *= 2
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if quick and batch > 4:  # the tiny search proves the loop, not the machine
            result["stopped_by"] = "quick: batch 4"
            break
    result.update(best)
    result["images_per_s"] = best["batch"] / best["step_s"]
    flops = flops_per_sample * best["batch"]
    result["model_flops_per_step"] = flops
    result["tflops_per_s"] = flops / best["step_s"] / 1e12
    peak = peak_tflops(result["device"]) if device.type == "cuda" else None
    result["peak_bf16_tflops"] = peak
    result["mfu"] = result["tflops_per_s"] / peak if peak else None
    if row.search_max_batch:
        result["estimate_gib"] = _shared("estimate", row, best["batch"], lambda: memory_estimate(row, best["batch"]))
    result["seconds"] = time.perf_counter() - started
    return result


def simulate_one(row: Row) -> dict:
    """The simulated step of ``row`` (``core.memsim`` on fake tensors, full size) beside the
    ``--dry-run`` estimate, as one JSON object."""
    from train.bench_step import simulate_row

    sim = simulate_row(row)
    result: dict[str, Any] = {"name": row.name, "row": row.name, "title": row.title, "status": "ok",
                              "batch_size": row.batch, "batch": row.batch, "image_size": row.image_size,
                              **sim.as_dict(), "budget_gib": row.budget_gib}
    if row.config:
        result["config"] = os.path.relpath(row.config, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    est = memory_estimate(row, row.batch)
    result["estimate_gib"] = est
    result["estimate_error_pct"] = 100.0 * (est - sim.peak_gib) / sim.peak_gib if est else None
    if row.budget_gib is not None:
        result["limit_gib"] = row.budget_gib - BUDGET_SLACK_GIB
        result["fits"] = sim.peak_gib <= row.budget_gib - BUDGET_SLACK_GIB
    return result


def _child(row: Row, quick: bool, warmup: int, steps: int, budget_s: float, path: str,
           simulate: bool = False) -> None:
    if quick or simulate:
        torch.set_num_threads(1)
    try:
        result = simulate_one(row) if simulate else run_row(row, quick, warmup, steps, budget_s)
    except BaseException as exc:  # noqa: BLE001 - reported as the row's result
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        result = {"row": row.name, "title": row.title, "status": "error", "error": last[:300]}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


def run_isolated(row: Row, quick: bool, warmup: int, steps: int, timeout_s: float, simulate: bool = False) -> dict:
    """``run_row`` (``simulate``: :func:`simulate_one`) in a forked process with a wall-clock
    limit; whatever happens, a result."""
    ctx = mp.get_context("fork")
    fd, path = tempfile.mkstemp(prefix=f"gpu_bench_{row.name}_", suffix=".json")
    os.close(fd)
    try:
        proc = ctx.Process(target=_child, args=(row, quick, warmup, steps, timeout_s, path, simulate), daemon=True)
        started = time.perf_counter()
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
            return {"row": row.name, "title": row.title, "status": "timeout",
                    "error": f"no result within {timeout_s:.0f} s", "seconds": time.perf_counter() - started}
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            how = "killed by SIGKILL (host out of memory?)" if proc.exitcode == -9 else f"exit code {proc.exitcode}"
            return {"row": row.name, "title": row.title, "status": "error", "error": f"no result: {how}"}
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


# ------------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------------
COLUMNS = ["row", "batch", "status", "peak alloc GiB", "peak reserved GiB", "estimate GiB", "step s",
           "images/s", "TFLOP/s", "MFU"]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        status = r.get("status", "?")
        if status != "ok":
            status += f" ({r.get('where') or r.get('error') or ''})".replace("|", "/") if (r.get("where") or r.get("error")) else ""
        mfu = r.get("mfu")
        cells = [f"{r['row']}: {r.get('title', '')}", _fmt(r.get("batch")), status, _fmt(r.get("peak_allocated_gib")),
                 _fmt(r.get("peak_reserved_gib")), _fmt(r.get("estimate_gib")), _fmt(r.get("step_s"), 3),
                 _fmt(r.get("images_per_s")), f"{r['tflops_per_s']:.3g}" if r.get("tflops_per_s") is not None else "-",
                 f"{100 * mfu:.1f} %" if mfu is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_one(row: Row, a: argparse.Namespace, timeout: float) -> dict:
    r = run_isolated(row, a.quick, a.warmup, a.steps, timeout)
    if a.peak_tflops and r.get("tflops_per_s") is not None:
        r["peak_bf16_tflops"], r["mfu"] = a.peak_tflops, r["tflops_per_s"] / a.peak_tflops
    print(f"{row.name}: {r.get('status')} ({r.get('seconds', 0):.0f} s)", file=sys.stderr, flush=True)
    return r


SIM_COLUMNS = ["row", "batch", "simulated peak GiB", "peak in", "weights", "gradients", "optimizer states",
               "activations", "temporaries", "estimate GiB", "estimate error", "budget GiB", "fits"]


def simulation_table(results: list[dict]) -> str:
    """The ``--simulate`` rows as a markdown table (GiB)."""
    lines = ["| " + " | ".join(SIM_COLUMNS) + " |", "|" + "---|" * len(SIM_COLUMNS)]
    for r in results:
        if r.get("status") != "ok":
            cells = [f"{r['row']}: {r.get('title', '')}", "-", f"{r.get('status')} ({r.get('error', '')})".replace("|", "/")]
            cells += ["-"] * (len(SIM_COLUMNS) - len(cells))
        else:
            b = r["breakdown_gib"]
            err = r.get("estimate_error_pct")
            fits = "-" if r.get("fits") is None else ("yes" if r["fits"] else f"NO (> {r['limit_gib']:.1f})")
            cells = [f"{r['row']}: {r.get('title', '')}", _fmt(r["batch_size"]), _fmt(r["simulated_peak_gib"]),
                     r["peak_phase"], *(_fmt(b.get(k, 0.0)) for k in ("weights", "gradients", "optimizer states",
                                                                      "activations", "temporaries")),
                     _fmt(r.get("estimate_gib")), f"{err:+.1f} %" if err is not None else "-",
                     _fmt(r.get("budget_gib"), 0), fits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def simulate_main(rows: list[Row], a: argparse.Namespace) -> int:
    """``--simulate``: each row's simulated step (own process, ``--row-timeout``, default 600 s)."""
    timeout = a.row_timeout or 600.0
    results = []
    for row in rows:
        r = run_isolated(row, False, 0, 0, timeout, simulate=True)
        r.setdefault("name", row.name)
        r.setdefault("batch_size", row.batch)
        print(f"{row.name}: {r.get('status')} ({r.get('simulate_seconds', 0):.0f} s)", file=sys.stderr, flush=True)
        results.append(r)
    print(f"bench/gpu.py --simulate, torch {torch.__version__}: one training step per row at full size on fake "
          f"tensors with a CUDA GPU's decisions (core/memsim.py); peak = what torch.cuda.max_memory_allocated would "
          f"report; estimate = --dry-run; a preset fits when its peak <= budget - {BUDGET_SLACK_GIB} GiB.")
    print(simulation_table(results))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump({"bench": "gpu-simulate", "torch": torch.__version__, "rows": results,
                       "definitions": [asdict(r) for r in rows]}, fh, indent=1)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="rows to run (see --list)")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--quick", action="store_true", help="tiny sizes on CPU: the same code path, in seconds")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 2; --quick 1)")
    p.add_argument("--row-timeout", type=float, default=None, help="seconds per row (default 90; --quick 60)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak, if not in the table")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--simulate", action="store_true",
                   help="no GPU: simulate each row's step at full size on the CPU (core/memsim.py) and print "
                        "peak, phase, breakdown and the --dry-run estimate")
    a = p.parse_args(argv)
    all_rows = ROWS + preset_rows()
    names = [r.name for r in all_rows]
    if a.list:
        for r in all_rows:
            print(f"{r.name:16s} {r.title} (batch {r.batch}, {r.image_size} px)")
        return 0
    unknown = [n for n in (a.only or []) if n not in names]
    if unknown:
        p.error(f"--only: unknown row(s) {unknown}; rows: {names}")
    a.steps = a.steps if a.steps is not None else (2 if a.quick else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    rows = [r for r in all_rows if not a.only or r.name in a.only]
    if a.simulate:
        return simulate_main(rows, a)
    if a.quick:
        rows = [quick_row(r) for r in rows]
    timeout = a.row_timeout or (60.0 if a.quick else 90.0)
    results = []
    # imported once here, before the rows are forked (the parent never initialises CUDA)
    import importlib

    for name in ("gdf.presets", "transformers.models.clip", "modules.controlnet", "modules.stage_b",
                 "modules.stage_c", "train.memory_specs", "train.diffusion_loss", "core.optim"):
        importlib.import_module(name)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    # their lazy imports and set-up, once (forward only: autograd's threads must not start before a fork)
    with FakeTensorMode(), FlopCounterMode(display=False):
        torch.nn.functional.conv2d(torch.empty(1, 2, 4, 4), torch.empty(2, 2, 1, 1)).sum()

    _SHARED["dir"] = tempfile.mkdtemp(prefix="gpu_bench_shared_")
    try:
        for row in rows:
            results.append(_run_one(row, a, timeout))
    finally:
        shutil.rmtree(_SHARED["dir"], ignore_errors=True)
    device = next((r["device"] for r in results if r.get("device")), "?")
    mfu_note = ("" if any(r.get("mfu") is not None for r in results)
                else " MFU not reported: the device's bf16 peak is not known (CPU or not in PEAK_BF16_TFLOPS; "
                     "pass --peak-tflops).")
    print(f"bench/gpu.py{' --quick' if a.quick else ''} on {device}, torch {torch.__version__}: "
          f"{a.warmup} warm-up + {a.steps} timed steps per row, model FLOPs (forward + backward of the trained "
          f"networks), estimate = --dry-run.{mfu_note}")
    print(markdown_table(results))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump({"bench": "gpu", "quick": a.quick, "device": device, "torch": torch.__version__,
                       "rows": results, "definitions": [asdict(r) for r in rows]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
