"""The combination matrix: every training job under every way of running it, on CPU with real processes.

    python3 tools/combination_matrix.py [--jobs train_c,train_b] [--procs 1,ddp,fsdp] [--quick]
                                        [--parallel N] [--work DIR] [--json FILE] [--list]

Each CELL is one job (``train_c``, ``train_c_lora``, ``train_c_controlnet``, ``train_b``) x processes
(``1``: one plain process, ``ddp``: ``torchrun --nproc_per_node=2``, ``fsdp``: the same with
``use_fsdp: True``; gloo on CPU) x bucketing (``multi_aspect_ratio`` of the official configs, on/off) x
``adaptive_loss_weight`` (on/off) x ``num_workers`` (0/2) x encoder cache (``cache_path`` on/off, only
for ``train_c`` and ``train_c_lora``; the LoRA cell then sets ``train_tokens: null``, which a cache
requires). Every cell starts from the job's OFFICIAL config (``configs/training/finetune_c_3b.yaml``,
``finetune_c_3b_lora.yaml``, ``controlnet_c_3b_canny.yaml``, ``finetune_b_3b.yaml``) switched to the
tiny models with ``--set`` only, and checks:

* trains: a straight run of ``UPDATES`` updates over a 10-sample dataset (more than one epoch, so it
  crosses epoch ends) exits 0, logs a finite loss for every update and writes its final checkpoint;
* resume-exact: a second run resumed (``--resume``) from the straight run's checkpoint of update
  ``RESUME_AT`` (mid-epoch, after an epoch end) gives bitwise the same losses and published weights;
* matches-1-process: a 2-process cell's losses and weights equal those of the 1-process cell with the
  same other settings (the standard of tests/test_train_distributed.py: loss within 1e-4, weights
  ``rtol=1e-4, atol=1e-5``).

What makes the last check well defined (as in tests/test_train_distributed.py): every sample holds the
same image and caption, module dropout is off (``generator_dropout: 0``; module dropout draws per rank)
and the 5 % random bucket is off (``bucket_random_ratio: 0``; a sample in a random bucket changes the
shapes of the batches it joins, and which batch that is depends on the per-rank batch). The image is
one row of a photograph repeated down a 128 x 64 (h x w) picture: with bucketing (``image_size`` 96)
it fills the 1/2 bucket (128 x 64) exactly; without, the random 96 x 96 crop of its 192 x 96 resize is
the same picture wherever it is cut, so the crop position (drawn per sample) cannot change the math either. The shards
hold 4, 3 and 3 samples, so ranks and workers get unequal shares and an epoch ends mid-batch.

The CONTROLS cells (``train_c_lora`` with 1 process and with DDP, bucketing, ``-controls`` in their
names) switch on every user control of train/ and core/ at once (:func:`controls_sets`): a cosine lr
schedule with restarts, two concepts (the shards with repeats and an image folder of RGBA images and
mask files as regularization data), the masked loss, offset noise, input perturbation and logit-normal
timesteps, a kohya prompt file for the previews (every 2 updates), TensorBoard, the preview CLIP score
and sample now / save now (SAMPLE_NOW and SAVE_NOW in the run folder before the straight run starts);
besides the three checks above, :func:`check_controls` looks at what each control leaves behind.

Prints a table of every cell and exits 1 if any cell fails. ``--quick`` runs a subset (every job with
bucketing + adaptive loss weight, 1 process, DDP and FSDP, no workers, no cache). Cells run in parallel
up to ``--parallel`` CPU slots (default: the CPU count; a 2-process cell takes 2 slots).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from tools.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]

#: updates of the straight run, and the checkpoint the resumed run starts from
UPDATES = 6
RESUME_AT = 3
#: the multi_aspect_ratio list of the official configs (finetune_c_3b.yaml; commented out in the others)
OFFICIAL_RATIOS = ["1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16"]
#: the smallest multiple of 32 at which every official ratio has a bucket (1/6 needs > 78)
IMAGE_SIZE = 96
#: samples per shard of the matrix dataset (10 samples: unequal shares per rank and worker)
SHARD_SIZES = (4, 3, 3)
CAPTION = "a photo of [fernando] the astronaut"  # the token of finetune_c_3b_lora.yaml's train_tokens
PROCS = ("1", "ddp", "fsdp")
#: the standard of tests/test_train_distributed.py
LOSS_TOL, RTOL, ATOL = 1e-4, 1e-4, 1e-5


@dataclass(frozen=True)
class Job:
    """A training script and its official config."""

    name: str
    script: str
    config: str
    stage_b: bool = False          # Stage B keys (no Previewer / CLIP image model)
    cache: bool = False            # the encoder cache is allowed
    ema: bool = True               # the job has an EMA copy (the LoRA job refuses the ema_* keys)
    sets: tuple[tuple[str, object], ...] = ()   # what the job's tiny version needs beyond the shared keys


JOBS: dict[str, Job] = {j.name: j for j in (
    Job("train_c", "train/train_c.py", "configs/training/finetune_c_3b.yaml", cache=True),
    # official: batch 32 = 4 accumulation steps; 8 keeps the accumulation and divides by 2 processes
    Job("train_c_lora", "train/train_c_lora.py", "configs/training/finetune_c_3b_lora.yaml", cache=True, ema=False,
        sets=(("batch_size", 8),)),
    # the tiny Stage C has 6 ResBlock calls (0..5); the official width/height filters ask for >= 768 px
    Job("train_c_controlnet", "train/train_c_controlnet.py", "configs/training/controlnet_c_3b_canny.yaml",
        sets=(("controlnet_blocks", [0, 2, 5]), ("controlnet_filter_params", {"resize": 64}),
              ("controlnet_bottleneck_mode", "simple"),
              ("dataset_filters", [["width", "lambda w: w >= 32"], ["height", "lambda h: h >= 32"]]))),
    Job("train_b", "train/train_b.py", "configs/training/finetune_b_3b.yaml", stage_b=True),
)}


@dataclass(frozen=True)
class Cell:
    """One combination."""

    job: str
    procs: str          # '1' | 'ddp' | 'fsdp'
    bucketing: bool
    adaptive: bool
    workers: int
    cache: bool
    controls: bool = False  # every user control on at once (controls_sets)

    @property
    def nproc(self) -> int:
        return 1 if self.procs == "1" else 2

    @property
    def name(self) -> str:
        return (f"{self.job}-{self.procs}-b{int(self.bucketing)}-a{int(self.adaptive)}-w{self.workers}"
                f"-c{int(self.cache)}" + ("-controls" if self.controls else ""))

    def single(self) -> "Cell":
        """The 1-process cell with the same other settings."""
        return Cell(self.job, "1", self.bucketing, self.adaptive, self.workers, self.cache, self.controls)


@dataclass
class Result:
    cell: Cell
    trains: Optional[bool] = None
    resume_exact: Optional[bool] = None
    matches_one: Optional[bool] = None      # None: not applicable (1 process) or not checked
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.trains) and bool(self.resume_exact) and self.matches_one is not False


def all_cells(jobs: Iterable[str] = JOBS, procs: Iterable[str] = PROCS) -> list[Cell]:
    """Every cell of the matrix for ``jobs`` and ``procs``."""
    out = []
    for job, p, bucketing, adaptive, workers, cache in itertools.product(
            jobs, procs, (False, True), (False, True), (0, 2), (False, True)):
        if cache and not JOBS[job].cache:
            continue
        out.append(Cell(job, p, bucketing, adaptive, workers, cache))
    return out + controls_cells(jobs, procs)


def controls_cells(jobs: Iterable[str] = JOBS, procs: Iterable[str] = PROCS) -> list[Cell]:
    """The LoRA job with every user control on (1 process and DDP), when ``jobs`` / ``procs`` include them."""
    return [Cell("train_c_lora", p, True, False, 0, False, controls=True)
            for p in ("1", "ddp") if "train_c_lora" in jobs and p in procs]


def select(cells: Iterable[Cell], **allowed: Optional[Sequence[object]]) -> list[Cell]:
    """The cells whose field ``name`` is in ``allowed[name]`` for every given (non-None) field."""
    return [c for c in cells if all(v is None or getattr(c, k) in v for k, v in allowed.items())]


def quick_cells(jobs: Iterable[str] = JOBS, procs: Iterable[str] = PROCS) -> list[Cell]:
    """Every job with bucketing and the adaptive loss weight, no workers, no cache; and the controls cells."""
    return [c for c in all_cells(jobs, procs)
            if (c.bucketing and c.adaptive and c.workers == 0 and not c.cache) or c.controls]


# ---------------------------------------------------------------------------------------- assets
def _matrix_image():
    """128 x 64 (h x w): the middle row of the astronaut photograph repeated down the picture."""
    import numpy as np
    from PIL import Image

    from tools.photo_shards import load_photo

    photo = load_photo("astronaut.png").convert("RGB").resize((64, 64), Image.BICUBIC)
    row = np.asarray(photo)[32:33]
    return Image.fromarray(np.repeat(row, 128, axis=0))


#: the frozen parts tools/make_demo_assets.py writes (the matrix takes them as they are)
FROZEN_PARTS = ("effnet_encoder.safetensors", "previewer.safetensors", "stage_a.safetensors", "clip", "saliency_model.pt")


def make_assets(folder: Path, frozen_from: Optional[Path] = None, caches: bool = True) -> Path:
    """The matrix assets under ``folder``, each part built once: the tiny frozen parts (linked from
    ``frozen_from``, a tools/make_demo_assets.py folder, when given), tiny "pretrained" Stage C / Stage B
    files, the matrix dataset and (``caches``) its two encoder caches (bucketed, fixed size)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not all((folder / p).exists() for p in FROZEN_PARTS):
        if frozen_from is not None:
            for part in FROZEN_PARTS:
                if not (folder / part).exists():
                    (folder / part).symlink_to(Path(frozen_from).resolve() / part)
        else:
            from tools.make_demo_assets import make_models

            make_models(folder, calibration_size=64)
    if not (folder / "shards.READY").is_file():
        from core.data.tarwrite import write_tar
        from fileio.state_dicts import save_safetensors
        from modules.registry import build_model
        from tools.photo_shards import jpeg_bytes

        with torch.random.fork_rng(devices=[]):
            for kind in ("stage_c", "stage_b"):
                torch.manual_seed(123)
                model = build_model(kind, "tiny")
                # A fresh network has a zero output conv (every other gradient is zero): a random one
                # makes the "pretrained" file train every part, LoRA and ControlNet included.
                torch.nn.init.xavier_uniform_(model.clf[1].weight)
                save_safetensors(model, folder / f"{kind}_tiny.safetensors")
        jpg = jpeg_bytes(_matrix_image(), 95)
        meta = json.dumps({"width": 64, "height": 128}).encode()
        index = 0
        for s, n in enumerate(SHARD_SIZES):
            samples = []
            for _ in range(n):
                samples.append((f"{index:04d}", {"jpg": jpg, "txt": CAPTION.encode(), "json": meta}))
                index += 1
            write_tar(str(folder / "shards" / f"matrix-{s:06d}.tar"), samples)
        (folder / "shards.READY").write_text("ok\n")
    for bucketing in ((False, True) if caches else ()):
        if not (cache_folder(folder, bucketing) / "cache.json").is_file():
            _write_cache(folder, bucketing)
    return folder


def _write_cache(assets: Path, bucketing: bool) -> None:
    from core.config import load_config
    from tools.cache_dataset import cache_dataset
    from train.train_c import StageCConfig

    cell = Cell("train_c", "1", bucketing, False, 0, False)
    sets = cell_sets(cell, assets, assets / "cache_run")
    cfg = load_config(StageCConfig, str(ROOT / JOBS["train_c"].config), sets)
    # shards of 4: the cache's shards are unequal too (4, 4, 2)
    cache_dataset(cfg, str(cache_folder(assets, bucketing)), batch_size=4, shard_size=4, progress=False)


def cache_folder(assets: Path, bucketing: bool) -> Path:
    return Path(assets) / ("cache_bucketed" if bucketing else "cache_fixed")


# --------------------------------------------------------------------------------------- running
def _value(v: object) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def cell_sets(cell: Cell, assets: Path, run_root: Path, **extra: object) -> list[str]:
    """The ``--set`` overrides that switch the cell's official config to the tiny models and data."""
    job = JOBS[cell.job]
    a = Path(assets)
    values: dict[str, object] = {
        "model_version": "tiny", "experiment_id": cell.name,
        "checkpoint_path": str(Path(run_root) / "ck"), "output_path": str(Path(run_root) / "out"),
        "wandb_project": None, "wandb_entity": None,
        "webdataset_path": str(a / "shards"),
        "effnet_checkpoint_path": str(a / "effnet_encoder.safetensors"),
        "generator_checkpoint_path": str(a / ("stage_b_tiny.safetensors" if job.stage_b else "stage_c_tiny.safetensors")),
        "clip_text_model_name": str(a / "clip/text"),
        "saliency_model_path": str(a / "saliency_model.pt"),  # fixed-size cells crop with it (crop: auto -> smart)
        "image_size": IMAGE_SIZE, "batch_size": 4, "updates": UPDATES, "save_every": RESUME_AT,
        "num_workers": cell.workers, "log_every": 1, "preview_every": 0, "num_preview_images": 2,
        "multi_aspect_ratio": OFFICIAL_RATIOS if cell.bucketing else None, "bucket_random_ratio": 0.0,
        "adaptive_loss_weight": cell.adaptive, "use_fsdp": cell.procs == "fsdp",
        "generator_dropout": 0.0,
    }
    if job.ema:  # an EMA copy from the first update, so resume and equivalence cover it too
        values.update(ema_start_iters=1, ema_iters=1, ema_beta=0.9)
    if job.stage_b:
        values["stage_a_checkpoint_path"] = str(a / "stage_a.safetensors")
    else:
        values["previewer_checkpoint_path"] = str(a / "previewer.safetensors")
        values["clip_image_model_name"] = str(a / "clip/vision")
    values.update(job.sets)
    if cell.cache:
        values["cache_path"] = str(cache_folder(a, cell.bucketing))
        if cell.job == "train_c_lora":
            values["train_tokens"] = None  # a cache holds CLIP outputs: trained tokens cannot use one
    if cell.controls:
        values.update(controls_sets(a))
    values.update(extra)
    return [f"{k}={_value(v)}" for k, v in values.items()]


# ------------------------------------------------------------------------------ the controls cells
PROMPTS_FILE = "controls_prompts.txt"
CONCEPT_FOLDER = "controls_concept"
SCORE_CLIP = "controls_score_clip"


def make_controls_assets(assets: Path, score_clip: Optional[Path] = None) -> None:
    """What the controls cells add to the assets (once): an image folder of the matrix image as RGBA
    PNGs (alpha = mask) and one with a ``.mask.png`` file, a kohya prompt file, and a tiny CLIP-score
    model (linked from ``score_clip`` when given, else written by tools/tiny_clip.py)."""
    import numpy as np

    a = Path(assets)
    if (a / "controls.READY").is_file():
        return
    folder = a / CONCEPT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    rgb = np.asarray(_matrix_image())
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, : rgb.shape[1] // 2] = 255  # the left half: the "subject"
    for i in range(3):
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(CAPTION)
    # the same mask as a file, beside the RGBA pictures' pixels as the data layer sees them (composited over
    # white), so every sample is one image and tensor (the 2-process cell must equal the 1-process one)
    Image.fromarray(np.where(alpha[..., None] > 0, rgb, 255).astype(np.uint8)).save(folder / "003.png")
    Image.fromarray(alpha).save(folder / "003.mask.png")
    (folder / "003.txt").write_text(CAPTION)
    (a / PROMPTS_FILE).write_text("# the controls cell's previews\n"
                                  "a photo of [fernando] the astronaut --w 64 --h 128 --s 2 --l 3 --d 7 --n blurry\n"
                                  "a photo of a dog --s 3 --l 1.5\n")
    if not (a / SCORE_CLIP).exists():
        if score_clip is not None:
            (a / SCORE_CLIP).symlink_to(Path(score_clip).resolve())
        else:
            from tools.tiny_clip import write_tiny_clip

            write_tiny_clip(a / SCORE_CLIP, projection_dim=16, image_size=32, patch_size=8, seed=5)
    (a / "controls.READY").write_text("ok\n")


def controls_sets(assets: Path) -> dict[str, object]:
    """Every user control on (see the module docstring)."""
    a = Path(assets)
    return {
        "lr_scheduler": "cosine_with_restarts", "lr_cycles": 2, "lr_final_ratio": 0.1, "warmup_updates": 2,
        "webdataset_path": None,
        "concepts": [{"name": "shards", "path": str(a / "shards"), "repeats": 2},
                     {"name": "folder", "path": str(a / CONCEPT_FOLDER), "repeats": 1, "regularization": True,
                      "caption_tag_shuffle": True}],
        "regularization_weight": 0.5,
        "masked_loss": True, "unmasked_weight": 0.2,
        "offset_noise": 0.05, "input_perturbation": 0.1, "timestep_distribution": "logit_normal",
        "preview_prompts_file": str(a / PROMPTS_FILE), "preview_every": 2,
        "tensorboard": True,
        "preview_clip_score": True, "preview_clip_model": str(a / SCORE_CLIP),
    }


def check_controls(run: Path, out: Path) -> str:
    """'' when a controls cell's straight run left every control's traces, else what is missing."""
    from core.logging import read_metrics

    records = read_metrics(str(run / "metrics.jsonl"))
    lrs = [r["lr"] for r in records if "lr" in r]
    if len(set(lrs)) < 3:
        return f"the lr did not follow the schedule: {lrs}"
    if not (run / "lr_schedule.png").is_file():
        return "no lr_schedule.png"
    if not (run / "state" / "step_00000001").is_dir() or (run / "SAVE_NOW").exists():
        return "SAVE_NOW did not save update 1"
    if not list(Path(out).glob("*_00000001.png")) or (run / "SAMPLE_NOW").exists():
        return "SAMPLE_NOW did not preview update 1"
    scores = [r for r in records if any(k.startswith("clip_score_") for k in r)]
    if [r["step"] for r in scores] != [1, 2, 4, 6]:
        return f"CLIP scores logged at {[r['step'] for r in scores]}, expected 1 (sample now), 2, 4, 6"
    if not any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").glob("*")):
        return "no TensorBoard event file"
    if not any("reg_raw_loss" in r for r in records):
        return "no regularization concept micro-batch was logged"
    return ""


def set_args(overrides: Sequence[str]) -> list[str]:
    """``['--set', 'k=v', ...]`` of ``KEY=VALUE`` overrides."""
    return [arg for item in overrides for arg in ("--set", item)]


def child_env() -> dict:
    """One CPU thread per training process (OpenMP spin-waiting on a shared machine is very slow)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def command(cell: Cell, args: Sequence[str]) -> list[str]:
    script = JOBS[cell.job].script
    if cell.nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cell.nproc}",
            f"--master_port={free_port()}", script, *args]


_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def run_command(cmd: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group (torchrun's workers included), killed as a group on a
    timeout or when the matrix stops (``stop_all``); raises TimeoutExpired after killing."""
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    """Kill every training run the matrix started (its own process groups only)."""
    with _RUNNING_LOCK:
        for proc in list(_RUNNING):
            _kill_group(proc)


def train(cell: Cell, assets: Path, run_root: Path, *more: str, timeout: float = 600, **extra: object
          ) -> subprocess.CompletedProcess:
    """Run the cell's job once; ``more``: extra command-line arguments (e.g. ``--resume PATH``)."""
    args = [JOBS[cell.job].config, *set_args(cell_sets(cell, assets, run_root, **extra)), *more]
    return run_command(command(cell, args), timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[int(rec["step"])] = rec["loss"]
    return out


def published(run_dir: Path) -> dict[str, dict]:
    """``{file name: state dict}`` of the model files at the top of a run folder."""
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(Path(run_dir).glob("*.safetensors"))}


#: the line that names why a run failed, most telling first (torchrun's own summary comes last)
_CAUSES = ("error:", "what():", "Error:", "Exception:", "is killed by signal")


def _fail_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    lines = [ln for ln in lines if "ChildFailedError" not in ln]
    for cause in _CAUSES:
        hits = [ln for ln in lines if cause in ln]
        if hits:
            return f"exit {proc.returncode}: {hits[0][:300]}"
    return f"exit {proc.returncode}: {(lines or ['(no output)'])[-1][:300]}"


def compare_weights(a: dict[str, dict], b: dict[str, dict], exact: bool) -> str:
    """'' when the model files agree (bitwise, or to the distributed tolerance), else what differs."""
    import torch

    if a.keys() != b.keys():
        return f"model files differ: {sorted(a)} vs {sorted(b)}"
    for name in a:
        if a[name].keys() != b[name].keys():
            return f"{name}: tensor names differ"
        for k in a[name]:
            x, y = a[name][k], b[name][k]
            if exact:
                if not torch.equal(x, y):
                    return f"{name} {k}: max |diff| {(x.float() - y.float()).abs().max().item():.3g}"
            elif not torch.allclose(x.float(), y.float(), rtol=RTOL, atol=ATOL):
                return f"{name} {k}: max |diff| {(x.float() - y.float()).abs().max().item():.3g}"
    return ""


def run_cell(cell: Cell, assets: Path, work: Path, resume: bool = True) -> Result:
    """Straight run, then (``resume``) a run resumed from its mid-way checkpoint; compares the two."""
    started = time.perf_counter()
    res = Result(cell)
    root = Path(work) / cell.name
    shutil.rmtree(root, ignore_errors=True)
    try:
        run = root / "ck" / cell.name
        if cell.controls:  # sample now + save now at the first update boundary
            make_controls_assets(assets)
            run.mkdir(parents=True)
            (run / "SAMPLE_NOW").touch()
            (run / "SAVE_NOW").touch()
        proc = train(cell, assets, root)
        got = losses(run)
        if proc.returncode != 0:
            res.trains, res.detail = False, "straight run " + _fail_line(proc)
        elif sorted(got) != list(range(1, UPDATES + 1)) or not all(math.isfinite(v) for v in got.values()):
            res.trains, res.detail = False, f"losses logged for updates {sorted(got)}: {got}"
        elif (run / "latest").read_text().strip() != f"step_{UPDATES:08d}":
            res.trains, res.detail = False, f"latest is {(run / 'latest').read_text().strip()!r}"
        elif cell.controls and check_controls(run, root / "out" / cell.name):
            res.trains, res.detail = False, check_controls(run, root / "out" / cell.name)
        else:
            res.trains = True
        if res.trains and resume:
            state = run / "state" / f"step_{RESUME_AT:08d}"
            proc = train(cell, assets, root, "--resume", str(state), experiment_id=cell.name + "-resumed")
            other = root / "ck" / (cell.name + "-resumed")
            if proc.returncode != 0:
                res.resume_exact, res.detail = False, "resumed run " + _fail_line(proc)
            else:
                after = {s: v for s, v in got.items() if s > RESUME_AT}
                back = losses(other)
                if back != after:
                    res.resume_exact = False
                    res.detail = f"losses after update {RESUME_AT}: straight {after} vs resumed {back}"
                else:
                    diff = compare_weights(published(run), published(other), exact=True)
                    res.resume_exact, res.detail = not diff, diff
    except subprocess.TimeoutExpired as e:
        res.trains = res.trains or False
        res.detail = f"timed out after {e.timeout:.0f} s"
    res.seconds = time.perf_counter() - started
    return res


def compare_to_single(res: Result, single: Optional[Result], work: Path) -> None:
    """Fill ``res.matches_one`` from the 1-process cell's straight run."""
    if res.cell.nproc == 1:
        return
    if not res.trains or single is None or not single.trains:
        if res.trains and not res.detail:  # this cell trained; what it is compared with did not
            res.detail = "no 1-process result to compare with"
        return
    one = Path(work) / single.cell.name / "ck" / single.cell.name
    two = Path(work) / res.cell.name / "ck" / res.cell.name
    l1, l2 = losses(one), losses(two)
    bad = [s for s in l1 if abs(l1[s] - l2.get(s, math.inf)) >= LOSS_TOL]
    if bad:
        res.matches_one = False
        s = bad[0]
        res.detail = res.detail or f"update {s}: loss {l2.get(s)} vs 1 process {l1[s]}"
        return
    diff = compare_weights(published(one), published(two), exact=False)
    res.matches_one = not diff
    if diff:
        res.detail = res.detail or f"vs 1 process: {diff}"


def run_matrix(cells: Sequence[Cell], assets: Path, work: Path, parallel: int,
               report: Callable[[Result], None] = lambda r: None) -> list[Result]:
    """Run ``cells`` (plus the 1-process cells the 2-process ones compare with) using at most
    ``parallel`` CPU slots; returns the results of ``cells`` in order."""
    wanted = list(dict.fromkeys(cells))
    todo = list(dict.fromkeys([*wanted, *(c.single() for c in wanted if c.nproc > 1)]))
    # biggest first: 2-process cells fill the slots while 1-process cells fill the gaps
    todo.sort(key=lambda c: -c.nproc)
    results: dict[Cell, Result] = {}
    lock = threading.Condition()
    free = [max(parallel, 1)]

    def worker(cell: Cell) -> None:
        try:
            res = run_cell(cell, assets, work)
        except Exception as exc:  # noqa: BLE001 - one broken cell is a red cell, not a crashed table
            res = Result(cell, trains=False, detail=f"{type(exc).__name__}: {exc}")
        with lock:
            results[cell] = res
            free[0] += min(cell.nproc, max(parallel, 1))
            lock.notify_all()
        report(res)

    threads = []
    for cell in todo:
        need = min(cell.nproc, max(parallel, 1))
        with lock:
            lock.wait_for(lambda: free[0] >= need)
            free[0] -= need
        t = threading.Thread(target=worker, args=(cell,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    for cell in wanted:
        compare_to_single(results[cell], results.get(cell.single()), work)
    return [results[c] for c in wanted]


# ----------------------------------------------------------------------------------------- table
def _mark(v: Optional[bool]) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def format_table(results: Sequence[Result]) -> str:
    head = ["job", "processes", "bucketing", "adaptive", "workers", "cache", "trains", "resume-exact",
            "matches-1-process", "seconds"]
    rows = [[r.cell.job, r.cell.procs, "on" if r.cell.bucketing else "off", "on" if r.cell.adaptive else "off",
             str(r.cell.workers), "on" if r.cell.cache else "off", _mark(r.trains), _mark(r.resume_exact),
             _mark(r.matches_one), f"{r.seconds:.0f}"] for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cols: "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    failed = [r for r in results if not r.ok]
    out.append(f"{len(results) - len(failed)} of {len(results)} cells green")
    for r in failed:
        out.append(f"FAILED {r.cell.name}: {r.detail}")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
    parser.add_argument("--procs", default=",".join(PROCS), help="comma-separated subset of 1,ddp,fsdp")
    parser.add_argument("--quick", action="store_true",
                        help="only bucketing + adaptive loss weight, num_workers 0, no cache")
    for name in ("bucketing", "adaptive", "cache"):
        parser.add_argument(f"--{name}", choices=("on", "off"), default=None, help=f"only cells with {name} on/off")
    parser.add_argument("--workers", choices=("0", "2"), default=None, help="only cells with this num_workers")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1,
                        help="CPU slots for cells running at once (a 2-process cell takes 2; default: CPU count)")
    parser.add_argument("--work", default=None, help="folder for assets and runs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    parser.add_argument("--list", action="store_true", help="list the selected cells and exit")
    args = parser.parse_args(argv)
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    procs = [p.strip() for p in args.procs.split(",") if p.strip()]
    unknown = [j for j in jobs if j not in JOBS] + [p for p in procs if p not in PROCS]
    if unknown:
        parser.error(f"unknown job/procs {unknown}; jobs: {list(JOBS)}, procs: {list(PROCS)}")
    onoff = lambda v: None if v is None else [v == "on"]  # noqa: E731
    cells = select((quick_cells if args.quick else all_cells)(jobs, procs), bucketing=onoff(args.bucketing),
                   adaptive=onoff(args.adaptive), cache=onoff(args.cache),
                   workers=None if args.workers is None else [int(args.workers)])
    if not cells:
        parser.error("no cell matches the selection")
    if args.list:
        print("\n".join(c.name for c in cells))
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="combination_matrix_"))
    started = time.perf_counter()
    print(f"{len(cells)} cells, {args.parallel} CPU slot(s), work folder {work}", flush=True)
    assets = make_assets(work / "assets", caches=any(c.cache for c in cells))
    done = [0]

    def report(res: Result) -> None:
        done[0] += 1
        state = "ok" if res.trains and res.resume_exact else "FAILED"
        print(f"[{done[0]}] {res.cell.name}: {state} ({res.seconds:.0f} s){' ' + res.detail if res.detail else ''}",
              flush=True)

    signal.signal(signal.SIGTERM, lambda *_: (stop_all(), os._exit(143)))
    try:
        results = run_matrix(cells, assets, work, args.parallel, report)
    except KeyboardInterrupt:
        stop_all()
        return 130
    print()
    print(format_table(results))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(asdict(r.cell), trains=r.trains, resume_exact=r.resume_exact,
                                                    matches_one=r.matches_one, seconds=round(r.seconds, 1),
                                                    detail=r.detail) for r in results], indent=1))
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
