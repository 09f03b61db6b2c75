"""A subset of the combination matrix (tools/combination_matrix.py runs all of it; README "Multi-GPU").

The official configs switched to the tiny models with ``--set`` only, trained with 2 processes
(torchrun, gloo) under DDP or FSDP with multi-aspect bucketing and the adaptive loss weight across
epoch ends: each run exits 0, a run resumed from its mid-way checkpoint repeats it bitwise, and the
2-process Stage C run equals the 1-process run. The fast tests check the matrix's own premises: every
cell's overrides are valid keys of its job, and the matrix data gives the same images however it is
split over ranks and workers.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tools.combination_matrix import (JOBS, UPDATES, Cell, all_cells, cell_sets, compare_to_single, make_assets,
                                      make_controls_assets, quick_cells, run_cell)

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def matrix_assets(train_assets, tmp_path_factory, one_thread) -> Path:
    """The matrix data and tiny Stage C / Stage B files over the session's frozen parts (no caches)."""
    return make_assets(tmp_path_factory.getbasetemp() / "matrix_assets", frozen_from=train_assets, caches=False)


def test_matrix_cells():
    cells = all_cells()
    assert len(cells) == len(set(cells)) == 3 * (16 + 16 + 8 + 8) + 2  # + the LoRA controls cells (1 process, DDP)
    assert {c.job for c in cells if c.cache} == {"train_c", "train_c_lora"}
    assert {(c.job, c.procs) for c in cells if c.controls} == {("train_c_lora", "1"), ("train_c_lora", "ddp")}
    assert all(c.bucketing and c.adaptive and c.workers == 0 and not c.cache for c in quick_cells() if not c.controls)
    assert len(quick_cells()) == 3 * len(JOBS) + 2


@pytest.mark.parametrize("job", list(JOBS))
def test_every_cell_is_the_official_config_with_valid_overrides(job, tmp_path):
    """load_config accepts every cell's ``--set`` list on the job's official config (paths unchecked)."""
    import importlib

    from core.config import load_config

    module = importlib.import_module(JOBS[job].script[:-3].replace("/", "."))
    trainer = next(v for k, v in vars(module).items() if k.endswith("Trainer") and v.__module__ == module.__name__)
    for cell in all_cells([job]):
        cfg = load_config(trainer.Config, str(ROOT / JOBS[job].config), cell_sets(cell, tmp_path, tmp_path),
                          validate_only=True, world_size=cell.nproc)
        assert cfg.model_version == "tiny" and cfg.updates == UPDATES
        assert bool(cfg.multi_aspect_ratio) == cell.bucketing and cfg.adaptive_loss_weight == cell.adaptive
        assert bool(cfg.use_fsdp) == (cell.procs == "fsdp") and cfg.num_workers == cell.workers
        assert bool(getattr(cfg, "cache_path", None)) == cell.cache


@pytest.mark.parametrize("bucketing", [False, True])
def test_matrix_data_is_the_same_on_any_split(matrix_assets, bucketing):
    """Every image of the matrix data is the same tensor, on 1 or 2 ranks with 0 or 2 workers (so the
    split cannot change the math), and bucketing gives a non-square bucket."""
    from core.config import load_config
    from core.data import build_pipeline
    from train.train_c import StageCConfig

    cell = Cell("train_c", "1", bucketing, False, 0, False)
    cfg = load_config(StageCConfig, str(ROOT / JOBS["train_c"].config),
                      cell_sets(cell, matrix_assets, matrix_assets / "unused"), validate_only=True)
    assert cfg.crop == ("random" if bucketing else "smart")  # crop: auto, as the official code
    from train.saliency import load_job_saliency

    saliency = load_job_saliency(cfg) if cfg.crop == "smart" else None
    first = None
    for world, workers in ((1, 0), (2, 0), (2, 2)):
        for rank in range(world):
            pipe = build_pipeline(cfg, batch_size=2, rank=rank, world_size=world, seed=cfg.seed, num_workers=workers,
                                  saliency=saliency)
            batches = iter(pipe)
            try:
                for _ in range(4):
                    images = next(batches)["images"]
                    first = images[0] if first is None else first
                    assert all(torch.equal(img, first) for img in images)
            finally:
                pipe.close()
    assert tuple(first.shape[1:]) == ((128, 64) if bucketing else (96, 96))


def _cell(job: str, procs: str) -> Cell:
    return Cell(job, procs, bucketing=True, adaptive=True, workers=0, cache=False)


#: Each official config with 2 processes, FSDP where it ships with use_fsdp: True (ControlNet, Stage B),
#: DDP for Stage C (and against 1 process) and for LoRA (use_fsdp: False). Every other cell, FSDP Stage C
#: and LoRA included: the matrix script (this file keeps the suite's budget, about 2 minutes here).
TWO_PROCESS = [pytest.param(_cell("train_c", "ddp"), id="train_c-ddp"),
               pytest.param(_cell("train_c_lora", "ddp"), id="train_c_lora-ddp"),
               pytest.param(_cell("train_c_controlnet", "fsdp"), id="train_c_controlnet-fsdp"),
               pytest.param(_cell("train_b", "fsdp"), id="train_b-fsdp")]


@pytest.fixture(scope="module")
def single_c(matrix_assets, tmp_path_factory):
    """The 1-process train_c run (straight only) the 2-process train_c cells are compared with."""
    work = tmp_path_factory.mktemp("matrix_single")
    res = run_cell(_cell("train_c", "1"), matrix_assets, work, resume=False)
    assert res.trains, res.detail
    return res, work


@pytest.mark.slow
@pytest.mark.parametrize("cell", TWO_PROCESS)
def test_official_config_two_processes_trains_and_resumes_exactly(cell, matrix_assets, tmp_path, request):
    res = run_cell(cell, matrix_assets, tmp_path)
    assert res.trains and res.resume_exact, res.detail
    if cell.job == "train_c":
        single, work = request.getfixturevalue("single_c")
        # the 1-process run lives in another folder: compare through a link in this test's folder
        (tmp_path / single.cell.name).symlink_to(work / single.cell.name)
        compare_to_single(res, single, tmp_path)
        assert res.matches_one, res.detail


@pytest.mark.slow
def test_lora_with_every_control_on_trains_saves_and_resumes_exactly(matrix_assets, score_clip, tmp_path):
    """The controls cell, 1 process: lr schedule, concepts (+ a regularization concept), masked loss, noise
    options, a prompt file, TensorBoard, the preview CLIP score and sample/save now, all at once
    (check_controls looks at each one's traces; the DDP cell: tools/combination_matrix.py)."""
    make_controls_assets(matrix_assets, score_clip=score_clip)
    res = run_cell(Cell("train_c_lora", "1", True, False, 0, False, controls=True), matrix_assets, tmp_path)
    assert res.trains and res.resume_exact, res.detail
