"""What a person watches: progress bar, metrics.jsonl, preview grids, loss curve, optional wandb.

Local files are always written (main rank only); a write that fails for an operating-system reason
(disk full, read-only file system) raises a one-line ``fileio.errors.WriteError`` naming the file.
wandb is used when ``wandb_project`` is set: it is imported lazily, honours its own settings
(``WANDB_MODE``, ``WANDB_BASE_URL``, ``WANDB_API_KEY``, ``WANDB_DIR``, ``WANDB_INIT_TIMEOUT``), runs
offline when the server of ``WANDB_BASE_URL`` does not answer within 3 s, and is an optional
integration (core/integrations.py): a missing package, no API key, a server that fails or a log
call that raises is ONE warning naming wandb and the reason, and the run continues without it.
Its files go to ``$WANDB_DIR/wandb/`` (default: the run folder); a resumed training continues the
same wandb run id (saved in the trainer state), offline too: each session is one
``offline-run-<time>-<id>`` folder, and ``wandb sync`` uploads them in order into one run.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import time
import uuid
from typing import Any, Mapping, Optional

import torch

from core.integrations import Integration
from fileio.atomic import atomic_write_bytes
from fileio.errors import WriteError

__all__ = ["RunLogger", "setup_logging", "image_grid", "read_metrics", "plot_loss", "plot_timesteps"]

log = logging.getLogger("core")

#: seconds wandb.init waits for its server before the run goes on without wandb (unless WANDB_INIT_TIMEOUT is set)
WANDB_INIT_TIMEOUT = 30.0

_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines through tqdm so they do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(is_main: bool = True, level: int = logging.INFO) -> None:
    """Configure Python logging once: a clear format on stderr; non-main ranks log only
    warnings and errors (so N processes do not repeat every line)."""
    root = logging.getLogger()
    if not any(getattr(h, "_cascade", False) for h in root.handlers):
        handler = _TqdmHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._cascade = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level if is_main else logging.WARNING)


def _jsonable(value: Any) -> Any:
    """Tensors -> numbers; non-finite floats -> None (JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def image_grid(images: torch.Tensor, nrow: int = 4, padding: int = 2) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> one (3, H', W') grid image, ``nrow`` images per row."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid expects (N, 3, H, W), got {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + padding) + padding, cols * (w + padding) + padding)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def _png_bytes(image: torch.Tensor) -> bytes:
    from PIL import Image

    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def plot_loss(metrics_path: str, out_path: str, key: str = "loss") -> bool:
    """Write a loss-curve PNG (raw + smoothed) from metrics.jsonl; False when there is nothing
    to plot. Uses a standalone Agg figure (no pyplot global state, nothing leaks)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [(r["step"], r[key]) for r in read_metrics(metrics_path)
              if isinstance(r.get(key), (int, float)) and "step" in r]
    if not points:
        return False
    steps, values = zip(*points)
    smooth, acc = [], None
    for v in values:
        acc = v if acc is None else 0.9 * acc + 0.1 * v
        smooth.append(acc)
    records = read_metrics(metrics_path)
    val_keys = [k for k in ("val_loss", "val_ema_loss") if any(isinstance(r.get(k), (int, float)) for r in records)]
    fig = Figure(figsize=(7, 6.5 if val_keys else 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if val_keys else 1, 1, 1)
    ax.plot(steps, values, alpha=0.35, label=key)
    ax.plot(steps, smooth, label=f"{key} (smoothed)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
    if val_keys:  # the held-out loss: its own panel (its scale differs from the noisy training loss)
        vax = fig.add_subplot(2, 1, 2, sharex=ax)
        for k in val_keys:
            pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float)) and "step" in r]
            vax.plot(*zip(*pts), marker="o", label=k)
        vax.set_ylabel("held-out loss")
        vax.grid(alpha=0.3)
        vax.legend()
        ax = vax
    ax.set_xlabel("optimizer update")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(out_path, buffer.getvalue())
    return True


def plot_timesteps(metrics_path: str, out_path: str, prefix: str = "val_mse_t") -> bool:
    """Write the per-timestep held-out MSE (``val_mse_t<t>`` keys) of the first, middle and last
    evaluations as lines over t; False when metrics.jsonl has none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    evals = [r for r in read_metrics(metrics_path) if any(k.startswith(prefix) for k in r)]
    if not evals:
        return False
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in sorted({id(e): e for e in (evals[0], evals[len(evals) // 2], evals[-1])}.values(), key=lambda e: e["step"]):
        pts = sorted((float(k[len(prefix):]), v) for k, v in r.items() if k.startswith(prefix) and isinstance(v, (int, float)))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"update {r['step']}")
    ax.set_xlabel("diffusion time t (0 = clean, 1 = pure noise)")
    ax.set_ylabel("held-out MSE (unweighted)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(out_path, buffer.getvalue())
    return True


def _wandb_server() -> str:
    """The wandb server this process talks to: ``WANDB_BASE_URL`` (wandb's own setting), else the cloud."""
    return (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").rstrip("/")


def _wandb_reachable(url: str, timeout: float = 3.0) -> Optional[str]:
    """None when an HTTP server answers at ``url`` within ``timeout`` seconds (any status), else the
    reason (refused, no answer, unknown host). A server that accepts the connection but never
    answers counts as unreachable: wandb would wait for it for minutes."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return None
    except urllib.error.HTTPError:
        return None  # it answered
    except urllib.error.URLError as exc:
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed WANDB_BASE_URL
        return str(exc) or type(exc).__name__


class RunLogger:
    """Progress bar, metrics.jsonl, previews, loss curve and optional wandb for one run.

    Non-main ranks get a silent logger (every method is a no-op), so callers need no rank checks.
    ``resume_step`` drops metrics.jsonl records after that step (they belong to the updates a
    crash threw away and are about to be redone); the trainer passes it on EVERY start (0 when no
    checkpoint was restored), so the log always matches the weights the run continues from."""

    def __init__(self, run_dir: str, cfg: Any, is_main: bool, total_steps: int,
                 wandb_project: Optional[str] = None, wandb_entity: Optional[str] = None,
                 run_id: Optional[str] = None, start_step: int = 0, resume_step: Optional[int] = None,
                 preview_dir: Optional[str] = None, run_name: Optional[str] = None) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self.total_steps = total_steps
        self.preview_dir = preview_dir or os.path.join(run_dir, "previews")
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.run_id = run_id or uuid.uuid4().hex[:8]  # saved by the trainer so wandb resumes the same run
        self.wandb: Any = None
        self._wandb_guard = Integration("wandb")  # every wandb call goes through it (core/integrations.py)
        self._bar: Any = None
        self.status: dict[str, float] = {}  # shown on the progress line until replaced (e.g. val_loss)
        self.tensorboard: Any = None  # core/tensorboard_log.py when the config's `tensorboard` is on
        self._last_step = start_step
        setup_logging(is_main)
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, unit="it", dynamic_ncols=True,
                         mininterval=0.5, file=sys.stderr)
        self._last_time = time.monotonic()
        if wandb_project:
            self._start_wandb(cfg, wandb_project, wandb_entity, run_name)
        if getattr(cfg, "tensorboard", False):
            from core.tensorboard_log import TensorBoardLogger

            folder = getattr(cfg, "tensorboard_dir", None) or os.path.join(run_dir, "tensorboard")
            self.tensorboard = TensorBoardLogger(folder, resume_step=resume_step)

    # ----------------------------------------------------------------------------- wandb
    def _start_wandb(self, cfg: Any, project: str, entity: Optional[str], run_name: Optional[str]) -> None:
        """wandb.init through the run's ``Integration`` guard: a missing package, no API key, an
        unreachable or broken server is one warning and the run goes on without wandb."""
        try:
            import wandb  # type: ignore[import-not-found]
        except ImportError:
            self._wandb_guard.disable("start", "wandb is not installed: pip install wandb")
            return
        mode = os.environ.get("WANDB_MODE")  # wandb's own setting wins (online, offline, disabled)
        # wandb's own WANDB_DIR wins; otherwise the run's files sit beside its checkpoints
        root = os.environ.get("WANDB_DIR") or self.run_dir
        if mode is None:
            server = _wandb_server()
            why = _wandb_reachable(server)
            if why is not None:
                mode = "offline"
                log.warning("wandb: server %s unreachable (%s): logging offline (upload later with `wandb sync %s`)",
                            server, why, os.path.join(root, "wandb", f"offline-run-*-{self.run_id}"))
        import dataclasses

        from core.config import config_to_dict

        config = config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else {}
        name = run_name or getattr(cfg, "experiment_id", None)

        def start() -> Any:
            # bounded: wandb waits init_timeout seconds for its server (WANDB_INIT_TIMEOUT, its own key, wins)
            settings = None if os.environ.get("WANDB_INIT_TIMEOUT") else wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT)
            return wandb.init(project=project, entity=entity, name=name, id=self.run_id, resume="allow", dir=root,
                              config=config, mode=mode or "online", settings=settings)

        self.wandb = self._wandb_guard.start(start)

    # ------------------------------------------------------------------------------ files
    def _truncate_after(self, step: int) -> None:
        records = read_metrics(self.metrics_path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records):
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write_bytes(self.metrics_path, text.encode("utf-8"))

    def progress(self, step: int, loss: Optional[float] = None, images: int = 0,
                 images_per_s: Optional[float] = None) -> None:
        """Advance the bar to ``step`` (optimizer updates). ``images`` = images in this update
        (the global batch) for the images/s figure, or give ``images_per_s`` directly. ``log``
        calls it too, so a loop that logs every update needs no separate call."""
        if self._bar is None:
            return
        now = time.monotonic()
        elapsed, self._last_time = max(now - self._last_time, 1e-9), now
        delta = step - self._bar.n
        if delta > 0:
            self._bar.update(delta)
        postfix = {"step": step}
        if isinstance(loss, (int, float)) and math.isfinite(float(loss)):
            postfix["loss"] = f"{float(loss):.4f}"
        if images_per_s is None and images:
            images_per_s = images * max(delta, 1) / elapsed
        if isinstance(images_per_s, (int, float)) and math.isfinite(images_per_s):
            postfix["img/s"] = f"{images_per_s:.1f}"
        postfix.update({k: f"{v:.4f}" for k, v in self.status.items() if math.isfinite(v)})
        self._bar.set_postfix(postfix, refresh=False)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl (and wandb); also advances
        the progress bar (``loss`` and ``images_per_s`` are shown when present)."""
        if not self.is_main:
            return
        record = {"step": int(step), "time": round(time.time(), 3), **_jsonable(dict(metrics))}
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # disk full, read-only file system: one line naming the file (a torn
            # last line is skipped by read_metrics)
            raise WriteError(self.metrics_path, exc.errno or 0, exc.strerror,
                             context=f"cannot log update {int(step)}: ") from exc
        if self.wandb is not None:
            values = {k: v for k, v in record.items() if k not in ("step", "time")}
            self._wandb_guard.call("log metrics", lambda: self.wandb.log(values, step=int(step)))
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, record)
        self._last_step = max(self._last_step, int(step))
        if self._bar is not None and step >= self._bar.n:
            self.progress(step, loss=record.get("loss"), images_per_s=record.get("images_per_s"))

    def log_images(self, step: int, name: str, images: torch.Tensor, nrow: int = 4) -> Optional[str]:
        """Save a PNG grid ``previews/{name}_{step:08d}.png`` and ``latest_{name}.png`` (and
        to wandb). Returns the grid path (None on non-main ranks)."""
        if not self.is_main:
            return None
        grid = image_grid(images, nrow=nrow)
        data = _png_bytes(grid)
        if self.tensorboard is not None:
            self.tensorboard.image(step, f"previews/{name}", grid)
        path = os.path.join(self.preview_dir, f"{name}_{step:08d}.png")
        atomic_write_bytes(path, data)
        atomic_write_bytes(os.path.join(self.preview_dir, f"latest_{name}.png"), data)
        if self.wandb is not None:
            def send() -> None:
                import wandb  # type: ignore[import-not-found]

                self.wandb.log({name: wandb.Image(path)}, step=int(step))

            self._wandb_guard.call("log images", send)
        return path

    def log_previews(self, step: int, grids: Mapping[str, torch.Tensor], nrow: int) -> None:
        """One grid per ``{name: images (N,3,H,W) in [0,1]}``; tiny images (CPU runs) are enlarged
        to at least 128 px so a person can see them."""
        for name, images in grids.items():
            images = images.detach().float().clamp(0, 1).cpu()
            if images.shape[-1] < 128:
                factor = -(-128 // images.shape[-1])
                images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
            self.log_images(step, name, images, nrow=min(len(images), nrow))

    def plot_loss(self, path: Optional[str] = None, key: str = "loss") -> Optional[str]:
        """Loss curve PNG from metrics.jsonl (default ``run_dir/loss.png``); None if no data."""
        if not self.is_main:
            return None
        path = path or os.path.join(self.run_dir, "loss.png")
        figure = os.path.join(os.path.dirname(path), "val_timesteps.png")
        if plot_timesteps(self.metrics_path, figure) and self.tensorboard is not None:
            self.tensorboard.figure_file(self._last_step, "validation/mse_over_t", figure)
        return path if plot_loss(self.metrics_path, path, key) else None

    def close(self) -> None:
        """Close the bar and finish wandb."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            self._wandb_guard.close(run.finish)
