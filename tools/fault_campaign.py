"""Reproduce every fault example of issues 13 and 28 on tiny assets and print what happened.

    python3 tools/fault_campaign.py [--only NAME[,NAME...]] [--keep DIR] [--timeout SECONDS] [--list]

Each case runs in its own process (a training run, the sampling CLI, or a data probe of this
script: ``--probe NAME DIR``) with a time limit, in a temporary folder holding tiny demo assets.
The table lists: case, expected outcome, observed outcome, exit code, message (first line). The
exit status is 1 when any case failed, 0 otherwise (cases that need a tmpfs mount, i.e. root,
are reported as ``skipped`` where mounting is not allowed).

The guarantees and the tests that prove them: README.md, "What survives what".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable, Optional

from tools.loopback import StatusServer, free_port

ROOT = Path(__file__).resolve().parents[1]

TINY_C = "configs/training/tiny_c.yaml"
DEFAULT_TIMEOUT = 180


@dataclass
class Result:
    """What one case observed; ``ok`` says whether it matched the expected outcome."""

    ok: Optional[bool]  # None = skipped
    outcome: str
    code: Optional[int]
    message: str


@dataclass
class Case:
    name: str
    expected: str
    run: Callable[["Campaign"], Result]


# ------------------------------------------------------------------------------------------------
# process helpers
# ------------------------------------------------------------------------------------------------
def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT),
                HF_HUB_OFFLINE="1")


def _with(env: Optional[dict]) -> dict:
    """The children's environment with ``env`` applied (a None value removes the variable)."""
    out = _env()
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _first_message(output: str) -> str:
    """The ``error:`` line when there is one, else the exception line of a traceback, else the
    last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error: "):
            return line
    if "Traceback (most recent call last)" in output:
        exc = [line for line in lines if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", line)]
        return "TRACEBACK " + (exc[-1] if exc else lines[-1])
    return lines[-1] if lines else ""


def _short(text: str, limit: int = 150) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Campaign:
    """The temporary folder, the tiny assets and the ways to run a case."""

    def __init__(self, folder: Path, timeout: int) -> None:
        self.dir = folder
        self.timeout = timeout
        self.assets = folder / "assets"
        self._runs = 0

    # -- assets
    def build_assets(self) -> None:
        import torch

        from tools.make_demo_assets import make_dataset, make_models

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            make_models(self.assets, calibration_size=64)
            make_dataset(self.assets, image_size=64, n_variants=2, n_shards=2, limit=8)
        finally:
            torch.set_num_threads(threads)

    def run_dir(self, name: str) -> Path:
        return self.dir / "runs" / name

    # -- processes
    def train_args(self, name: str, root: Optional[Path] = None, **overrides) -> list[str]:
        a = self.assets
        root = root or self.dir / "runs"
        values = {
            "experiment_id": name, "checkpoint_path": str(root), "output_path": str(self.dir / "out"),
            "webdataset_path": str(a / "shards"), "effnet_checkpoint_path": str(a / "effnet_encoder.safetensors"),
            "previewer_checkpoint_path": str(a / "previewer.safetensors"),
            "clip_text_model_name": str(a / "clip/text"), "clip_image_model_name": str(a / "clip/vision"),
            "image_size": 64, "batch_size": 2, "num_workers": 0, "num_preview_images": 2, "log_every": 1,
            "warmup_updates": 1, "updates": 2, "save_every": 2, "preview_every": 0,
        }
        values.update(overrides)
        args = []
        for key, value in values.items():
            args += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
        return args

    def run(self, argv: list[str], timeout: Optional[int] = None, umask: Optional[int] = None,
            on_start: Optional[Callable[[subprocess.Popen], None]] = None,
            env: Optional[dict] = None) -> tuple[int, str]:
        """Run ``argv`` (after the python interpreter) in the repository root; (exit code, output)."""
        def preexec() -> None:
            if umask is not None:
                os.umask(umask)

        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=_with(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=preexec)
        watcher = None
        if on_start is not None:
            watcher = threading.Thread(target=on_start, args=(proc,), daemon=True)
            watcher.start()
        try:
            out, _ = proc.communicate(timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            return 124, out + "\n(timed out)"
        if watcher is not None:
            watcher.join(timeout=5)
        return proc.returncode, out

    def train(self, name: str, *extra: str, config: str = TINY_C, root: Optional[Path] = None,
              umask: Optional[int] = None, on_start=None, env: Optional[dict] = None, **overrides) -> tuple[int, str]:
        return self.run(["train/train_c.py", config, *self.train_args(name, root, **overrides), *extra],
                        umask=umask, on_start=on_start, env=env)

    def probe(self, name: str) -> tuple[int, str, dict]:
        folder = self.dir / "probes" / name
        folder.mkdir(parents=True, exist_ok=True)
        code, out = self.run([str(Path(__file__).relative_to(ROOT)), "--probe", name, str(folder), "--assets",
                              str(self.assets)])
        found = [line for line in out.splitlines() if line.startswith("PROBE ")]
        result = json.loads(found[-1][6:]) if found else {}
        return code, out, result


# ------------------------------------------------------------------------------------------------
# expectations
# ------------------------------------------------------------------------------------------------
def user_error(code: int, out: str, *fragments: str) -> Result:
    """Expected: exit 2 and one ``error:`` line holding every fragment, no traceback."""
    message = _first_message(out)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    ok = code == 2 and "Traceback" not in out and len(errors) == 1 and all(f in errors[0] for f in fragments)
    if ok:
        outcome = "one-line error"
    elif "Traceback" in out:
        outcome = "traceback"
    elif code == 0:
        outcome = "accepted (exit 0)"
    else:
        outcome = "error without the expected text"
    return Result(ok, outcome, code, message)


def _latest(run: Path) -> Optional[str]:
    try:
        return (run / "latest").read_text().strip()
    except OSError:
        return None


def _temp_files(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def _all_finite(path: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.isfinite().all()) for t in load_file(str(path)).values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------
# cases: class 1 (non-finite weights)
# ------------------------------------------------------------------------------------------------
def case_lr_inf(c: Campaign) -> Result:
    return user_error(*c.train("lr_inf", lr=".inf"), "'lr'")


def case_lr_1e30(c: Campaign) -> Result:
    return user_error(*c.train("lr_1e30", lr="1e30"), "'lr'")


def case_lr_at_bound(c: Campaign) -> Result:
    code, out = c.train("lr_1", lr=1.0, updates=3, save_every=1, max_nonfinite_steps=5)
    run = c.run_dir("lr_1")
    files = sorted(run.rglob("*.safetensors"))
    bad = [str(p.relative_to(run)) for p in files if not _all_finite(p)]
    if bad:
        return Result(False, f"non-finite tensors saved in {bad[:2]}", code, _first_message(out))
    if code == 0:
        return Result(True, f"trained, {len(files)} model files all finite", code, _first_message(out))
    ok = "Traceback" not in out and "update" in _first_message(out)
    return Result(ok, "stopped naming the update, nothing non-finite saved" if ok else "traceback",
                  code, _first_message(out))


# ------------------------------------------------------------------------------------------------
# class 2 (I/O errors while saving): tmpfs mounts
# ------------------------------------------------------------------------------------------------
class _Tmpfs:
    def __init__(self, path: Path, size: str) -> None:
        self.path, self.size, self.mounted = path, size, False

    def __enter__(self) -> "_Tmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        self.mounted = proc.returncode == 0
        self.reason = proc.stderr.strip()
        return self

    def remount_ro(self) -> bool:
        proc = subprocess.run(["mount", "-o", "remount,ro", str(self.path)], capture_output=True, text=True)
        return proc.returncode == 0

    def __exit__(self, *exc) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def _save_failure(c: Campaign, name: str, code: int, out: str, run: Path, reason: str,
                  previous: str) -> Result:
    message = _first_message(out)
    latest = _latest(run)
    leftovers = _temp_files(run)
    checks = {
        "exit != 0": code != 0,
        "no traceback": "Traceback" not in out,
        f"message says '{reason}'": reason in message,
        f"latest = {previous}": latest == previous,
        "no temp files": not leftovers,
    }
    failed = [k for k, v in checks.items() if not v]
    outcome = "as expected" if not failed else "failed: " + ", ".join(failed)
    if latest != previous:
        outcome += f" (latest: {latest})"
    return Result(not failed, outcome, code, message)


def case_disk_full(c: Campaign) -> Result:
    with _Tmpfs(c.dir / "mnt_full", "4m") as fs:
        if not fs.mounted:
            return Result(None, f"skipped (cannot mount tmpfs: {fs.reason})", None, "")
        code, out = c.train("full", root=fs.path, updates=4, save_every=2)
        return _save_failure(c, "full", code, out, fs.path / "full", "No space left on device", "step_00000002")


def case_read_only(c: Campaign) -> Result:
    with _Tmpfs(c.dir / "mnt_ro", "64m") as fs:
        if not fs.mounted:
            return Result(None, f"skipped (cannot mount tmpfs: {fs.reason})", None, "")
        run = fs.path / "ro"
        state = {"remounted": False}

        def remount_after_first_checkpoint(proc: subprocess.Popen) -> None:
            deadline = time.time() + c.timeout
            while proc.poll() is None and time.time() < deadline:
                if _latest(run) == "step_00000002":
                    for _ in range(50):  # busy while a file is open for writing: retry
                        if fs.remount_ro():
                            state["remounted"] = True
                            return
                        time.sleep(0.05)
                    return
                time.sleep(0.02)

        code, out = c.train("ro", root=fs.path, updates=40, save_every=2, on_start=remount_after_first_checkpoint)
        if not state["remounted"]:
            return Result(False, "could not remount read-only during the run", code, _first_message(out))
        latest = _latest(run)
        result = _save_failure(c, "ro", code, out, run, "Read-only file system", latest or "?")
        complete = latest is not None and (run / "state" / latest / "COMPLETE").is_file()
        if not complete:
            result.ok, result.outcome = False, f"latest {latest} is not a complete checkpoint"
        return result


# ------------------------------------------------------------------------------------------------
# class 3 (resume from a corrupt newest state)
# ------------------------------------------------------------------------------------------------
def _corrupt_resume(c: Campaign, name: str, corrupt: Callable[[Path], None]) -> Result:
    code, out = c.train(name, updates=4, save_every=2)
    if code != 0:
        return Result(False, "the first run failed", code, _first_message(out))
    run = c.run_dir(name)
    corrupt(run / "state" / "step_00000004")
    code, out = c.train(name, updates=6, save_every=2)
    message = _first_message(out)
    ok = code == 0 and "Traceback" not in out and re.search(r"resum\w* from update 2\b", out) is not None
    if ok:
        return Result(True, "fell back to update 2 and finished", code, message)
    return Result(False, "traceback" if "Traceback" in out else "no fallback to update 2", code, message)


def case_truncated_optimizer(c: Campaign) -> Result:
    def truncate(state: Path) -> None:
        path = state / "optimizer.pt"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return _corrupt_resume(c, "trunc_opt", truncate)


def case_garbage_trainer_json(c: Campaign) -> Result:
    return _corrupt_resume(c, "garbage_json", lambda state: (state / "trainer.json").write_text("{garbage"))


# ------------------------------------------------------------------------------------------------
# class 4 (image decoding, tar headers): probes run in a child process (--probe)
# ------------------------------------------------------------------------------------------------
def _png(image) -> bytes:
    buf = BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _good_samples(n: int, start: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(start)
    return [(f"{start + i:06d}", {"png": _png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))),
                                  "txt": b"a random picture", "json": b'{"aesthetic": 5.0}'})
            for i in range(n)]


def _collect_logs():
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname} {record.getMessage()}")

    handler = Keep()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    return records


def _pipeline(shards, **keys):
    from core.data import DataConfig, build_pipeline

    cfg = DataConfig(webdataset_path=[str(s) for s in shards], image_size=64, num_workers=0,
                     shuffle_buffer=4, **keys)
    return build_pipeline(cfg, batch_size=1, seed=0)


def probe_png16(folder: Path) -> dict:
    import numpy as np
    from PIL import Image

    from core.data.tarwrite import write_tar

    grey = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))  # mode I;16, mid-grey
    shard = write_tar(str(folder / "grey16.tar"), [("000000", {"png": _png(grey), "txt": b"grey"})])
    pipe = _pipeline([shard])
    batch = next(iter(pipe))
    pipe.close()
    mean = float(batch["images"].mean())
    return {"ok": abs(mean - 0.5) < 0.02, "outcome": f"mean {mean:.3f} (mode {grey.mode})",
            "message": f"decoded mean {mean:.3f}, expected 0.500"}


def _tar_with_bad_size(path: Path) -> tuple[str, int]:
    """A ustar shard of 4 samples whose 3rd member has a valid checksum but a non-octal size."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, files in _good_samples(4, start=100):
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, BytesIO(data))
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[2].offset
    raw = bytearray(path.read_bytes())
    header = raw[offset:offset + 512]
    header[124:136] = b"zzzzzzzzzzz\0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    raw[offset:offset + 512] = header
    path.write_bytes(bytes(raw))
    return str(path), offset


def probe_tar_non_octal(folder: Path) -> dict:
    from core.data.tarwrite import write_tar

    logs = _collect_logs()
    bad, offset = _tar_with_bad_size(folder / "bad-000000.tar")
    good = write_tar(str(folder / "good-000001.tar"), _good_samples(3))
    pipe = _pipeline([bad, good])
    keys = set()
    for _ in range(12):
        keys.update(next(pipe)["keys"])
        if len({k for k in keys if k.startswith("0000")}) == 3:
            break
    stats = pipe.stats()
    pipe.close()
    text = json.dumps(stats.get("records", [])) + " ".join(logs)
    good_read = len({k for k in keys if k.startswith("0000")}) == 3
    named = bad in text and (str(offset) in text or "offset" in text)
    return {"ok": good_read and named,
            "outcome": ("bad shard reported, rest used" if good_read and named else
                        f"good samples used: {good_read}; shard url+offset reported: {named}"),
            "message": _short(next((r for r in logs if bad in r), "no log line names the shard"))}


def probe_png_1bit_huge(folder: Path) -> dict:
    import resource

    from PIL import Image

    from core.data.tarwrite import write_tar

    huge = Image.new("1", (20000, 20000))
    data = _png(huge)
    del huge
    shard = write_tar(str(folder / "huge.tar"), [("huge", {"png": data, "txt": b"huge"}), *_good_samples(2)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pipe = _pipeline([shard])
    keys = set()
    for _ in range(6):
        keys.update(next(pipe)["keys"])
        if len(keys - {"huge"}) == 2:
            break
    stats = pipe.stats()
    pipe.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counted_bad = sum(stats.get("bad", {}).values()) >= 1 and "huge" not in keys
    ok = counted_bad and peak - before < 1000
    return {"ok": ok, "outcome": f"counted bad: {counted_bad}; peak rss +{peak - before:.0f} MB",
            "message": json.dumps(stats.get("bad", {}))}


def probe_shard_missing(folder: Path) -> dict:
    from core.data.tarwrite import write_tar

    logs = _collect_logs()
    shards = [write_tar(str(folder / f"s-{i:06d}.tar"), _good_samples(2, start=10 * i)) for i in range(3)]
    pipe = _pipeline(shards)
    os.unlink(shards[1])  # goes missing after the run listed it (an outage, a deleted file)
    for _ in range(6):  # more than one epoch of the 4 samples left: the missing shard was tried
        next(pipe)
    during = [r for r in logs if shards[1] in r]
    pipe.close()
    after = [r for r in logs if shards[1] in r]
    return {"ok": bool(during), "outcome": ("logged when it happened" if during else
                                           "only in the final summary" if after else "never logged"),
            "message": _short((during or after or ["-"])[0])}


def probe_summary_counts(folder: Path) -> dict:
    import numpy as np
    from PIL import Image

    from core.data.tarwrite import write_tar

    logs = _collect_logs()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):
        h, w = (64, 128) if i % 3 else (128, 64)
        meta = b'{"aesthetic": %d}' % (i % 4)
        samples.append((f"{i:06d}", {"png": _png(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))),
                                     "txt": b"x", "json": meta}))
    samples.append(("broken", {"png": b"not an image", "txt": b"x", "json": b'{"aesthetic": 3}'}))
    shard = write_tar(str(folder / "mixed.tar"), samples)
    from core.data import DataConfig, build_pipeline

    cfg = DataConfig(webdataset_path=shard, image_size=64, num_workers=0, shuffle_buffer=16,
                     multi_aspect_ratio=["1/2"], bucket_random_ratio=0.0,
                     dataset_filters=[["aesthetic", "lambda s: s > 0"]])
    pipe = build_pipeline(cfg, batch_size=3, seed=0)
    for _ in range(2):
        next(pipe)
    st = pipe.stats()  # while samples wait in buckets
    pipe.close()
    line = next((r for r in reversed(logs) if "samples emitted" in r), "")
    parts = {"emitted": st["samples"], "waiting": st["waiting"], "filtered": sum(st["filtered"].values()),
             "missing": sum(st["missing_key"].values()), "bad": st["bad_samples"]}
    total = sum(parts.values())
    # the logged summary line states the same totals
    logged = re.search(r"= read (\d+)", line)
    ok = total == st["read"] and logged is not None and int(logged.group(1)) == st["read"]
    return {"ok": ok, "outcome": " + ".join(f"{k} {v}" for k, v in parts.items()) + f" = {total}, read = {st['read']}",
            "message": _short(line.split("INFO ", 1)[-1])}


PROBES = {"png16": probe_png16, "tar_non_octal": probe_tar_non_octal, "png_1bit_huge": probe_png_1bit_huge,
          "shard_missing": probe_shard_missing, "summary_counts": probe_summary_counts}


def _probe_case(name: str) -> Callable[[Campaign], Result]:
    def run(c: Campaign) -> Result:
        code, out, result = c.probe(name)
        if not result:
            return Result(False, "probe crashed" if "Traceback" in out else "no result", code, _first_message(out))
        return Result(bool(result["ok"]) and code == 0, result["outcome"], code, result["message"])

    return run


# ------------------------------------------------------------------------------------------------
# class 5 (config) and 6 (visibility)
# ------------------------------------------------------------------------------------------------
def case_duplicate_key(c: Campaign) -> Result:
    config = c.dir / "dup_key.yaml"
    config.write_text((ROOT / TINY_C).read_text() + "lr: 5.0e-2\n")
    return user_error(*c.train("dup", config=str(config)), "'lr'", "twice")


def case_empty_experiment_id(c: Campaign) -> Result:
    return user_error(*c.train('""'), "experiment_id")


def case_batch_size(c: Campaign) -> Result:
    return user_error(*c.train("bs", batch_size=10 ** 12), "batch_size")


def case_num_workers(c: Campaign) -> Result:
    return user_error(*c.train("nw", num_workers=100000), "num_workers", "CPU")


def case_image_size(c: Campaign) -> Result:
    return user_error(*c.train("isz", image_size=10 ** 9), "image_size")


def case_expensive_filter(c: Campaign) -> Result:
    rule = json.dumps([["aesthetic", "lambda s: 'x' * 100000000000 == s"]])
    return user_error(*c.train("filt", dataset_filters=rule), "dataset_filters")


def case_missing_clip(c: Campaign) -> Result:
    return user_error(*c.train("clip", clip_text_model_name=str(c.dir / "no_such_clip")), "no_such_clip")


def case_int_generator(c: Campaign) -> Result:
    import torch
    from safetensors.torch import save_file

    from modules.registry import build_model

    sd = {k: v.contiguous() for k, v in build_model("stage_c", "tiny").state_dict().items()}
    first = next(iter(sd))
    sd[first] = sd[first].to(torch.int32)
    path = c.dir / "int_generator.safetensors"
    save_file(sd, str(path))
    return user_error(*c.train("intgen", generator_checkpoint_path=str(path)), "int_generator.safetensors")


def case_missing_models_file(c: Campaign) -> Result:
    return user_error(*c.train("models", effnet_checkpoint_path="models/effnet_encoder.safetensors"),
                      "bash models/download_models.sh")


def case_controlnet_no_control(c: Campaign) -> Result:
    code, out = c.run(["-m", "inference.sample", "--config", "configs/inference/tiny_c.yaml",
                       "--set", "controlnet_filter=CannyFilter", "--set", "controlnet_blocks=[0, 2]",
                       "--set", "controlnet_checkpoint_path=cnet.safetensors", "--prompt", "a house",
                       "--out", str(c.dir / "sample_out")])
    return user_error(code, out, "--control-image")


def case_file_modes(c: Campaign) -> Result:
    code, out = c.train("modes", umask=0o022, updates=2, save_every=1)
    run = c.run_dir("modes")
    if code != 0:
        return Result(False, "the run failed", code, _first_message(out))
    wrong = [f"{p.relative_to(run)}={oct(p.stat().st_mode & 0o777)}" for p in sorted(run.rglob("*"))
             if p.is_file() and p.stat().st_mode & 0o777 != 0o644]
    if wrong:
        return Result(False, f"{len(wrong)} files not 0644 under umask 022", code, _short(", ".join(wrong[:4])))
    return Result(True, "every file 0644 under umask 022", code, "")


# ------------------------------------------------------------------------------------------------
# round three (issue 28): integrations, non-finite weights in tools and inputs, logs, validate-only,
# the real culprit named
# ------------------------------------------------------------------------------------------------
def _wandb_env(c: Campaign, url: str) -> dict:
    home = c.dir / "wandb_home"
    home.mkdir(exist_ok=True)
    return {"WANDB_BASE_URL": url, "HOME": str(home), "WANDB_CONFIG_DIR": str(home), "WANDB_API_KEY": None,
            "WANDB_MODE": None, "WANDB_SILENT": "true"}


def _wandb_case(c: Campaign, name: str, url: str, expect: str) -> Result:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return Result(None, "skipped (wandb is not installed)", None, "")
    code, out = c.train(name, env=_wandb_env(c, url), wandb_project="faults3")
    warnings = [line for line in out.splitlines() if "WARNING" in line and "wandb" in line]
    ok = code == 0 and "Traceback" not in out and len(warnings) == 1 and expect in warnings[0]
    return Result(ok, "trained, one wandb warning" if ok else f"{len(warnings)} wandb warning(s)", code,
                  _short(warnings[0].split("] ", 1)[-1]) if warnings else _first_message(out))


def case_wandb_refused(c: Campaign) -> Result:
    url = f"http://127.0.0.1:{free_port()}"
    return _wandb_case(c, "wandb_refused", url, "offline")


def case_wandb_no_key(c: Campaign) -> Result:
    with StatusServer(401) as server:
        return _wandb_case(c, "wandb_nokey", server.url, "wandb: cannot start")


def case_metrics_restart(c: Campaign) -> Result:
    run = c.run_dir("restart")
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": 9.0}}\n' for s in (1, 2, 3)))
    code, out = c.train("restart")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return Result(code == 0 and steps == [1, 2], f"steps in metrics.jsonl: {steps}", code, _first_message(out))


def _tiny_files(c: Campaign) -> dict:
    """A tiny Stage C file and LoRA files (named: a NaN; kohya: inconsistent ranks) for the tools."""
    import torch
    from safetensors.torch import save_file

    from modules.lora import apply_lora
    from modules.lora_formats import entries_from_named, export_kohya, named_state_dict, stage_c_targets
    from modules.registry import build_model

    folder = c.dir / "tool_inputs"
    if (folder / "done").exists():
        return {p.stem: p for p in folder.iterdir()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model("stage_c", "tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "base.safetensors"))
    loras = apply_lora(model, [".attn"], rank=2)
    for _, lora in loras:
        torch.nn.init.normal_(lora.lora_up, std=0.01)
        torch.nn.init.normal_(lora.lora_down, std=0.1)
    named = named_state_dict(loras, alpha=1.0)
    nan = dict(named)
    key = next(k for k in nan if k.endswith(".lora_up"))
    nan[key] = nan[key].clone().fill_(float("nan"))
    save_file(nan, str(folder / "lora_nan.safetensors"))
    _, shapes = stage_c_targets("tiny", [".attn"])
    kohya = export_kohya(entries_from_named(named), shapes)
    up = next(k for k in kohya if "out_proj" in k and k.endswith(".lora_up.weight"))
    kohya[up] = kohya[up][:, :1].contiguous()
    save_file(kohya, str(folder / "kohya_ranks.safetensors"))
    generator = {k: v.detach().clone().contiguous() for k, v in build_model("stage_c", "tiny").state_dict().items()}
    first = next(k for k, v in generator.items() if v.is_floating_point())
    generator[first].view(-1)[0] = float("nan")
    save_file(generator, str(folder / "generator_nan.safetensors"))
    (folder / "done").write_text("")
    return {p.stem: p for p in folder.iterdir()}


def case_lora_merge_nan(c: Campaign) -> Result:
    files = _tiny_files(c)
    out = c.dir / "merged_nan.safetensors"
    result = user_error(*c.run(["tools/lora_merge.py", "--base", str(files["base"]), "--lora", str(files["lora_nan"]),
                                "--out", str(out)]), "lora_nan.safetensors", "NaN")
    if out.exists():
        result.ok, result.outcome = False, "a merged file was written"
    return result


def case_kohya_ranks(c: Campaign) -> Result:
    files = _tiny_files(c)
    return user_error(*c.run(["tools/lora_merge.py", "--base", str(files["base"]), "--lora",
                              str(files["kohya_ranks"]), "--out", str(c.dir / "merged_kohya.safetensors")]),
                      "kohya_ranks.safetensors", "inconsistent")


def case_nan_generator(c: Campaign) -> Result:
    files = _tiny_files(c)
    code, out = c.train("nan_gen", generator_checkpoint_path=str(files["generator_nan"]))
    result = user_error(code, out, "generator_nan.safetensors", "NaN")
    if "lr" in result.message.split("NaN", 1)[-1]:
        result.ok, result.outcome = False, "blamed on the learning rate"
    return result


def _diffusers_folder(c: Campaign, name: str) -> Path:
    files = _tiny_files(c)
    folder = c.dir / name
    shutil.rmtree(folder, ignore_errors=True)
    code, out = c.run(["tools/export_diffusers.py", str(files["base"]), "--out", str(folder)])
    if code != 0:
        raise RuntimeError(f"export failed: {_first_message(out)}")
    return folder


def case_diffusers_no_config(c: Campaign) -> Result:
    folder = _diffusers_folder(c, "prior_no_config")
    (folder / "config.json").unlink()
    return user_error(*c.train("diff_nocfg", generator_checkpoint_path=str(folder)), "without config.json")


def case_diffusers_damaged_c(c: Campaign) -> Result:
    from safetensors.torch import load_file, save_file

    folder = _diffusers_folder(c, "prior_damaged")
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    del sd[next(k for k in sd if k.startswith("down_blocks.0.0"))]
    save_file(sd, str(weights))
    code, out = c.run(["tools/export_diffusers.py", str(folder), "--to-official", "--out",
                       str(c.dir / "back.safetensors")])
    result = user_error(code, out, "Stage C", "missing keys")
    if "Stage B" in result.message:
        result.ok, result.outcome = False, "called a Stage B checkpoint"
    return result


def case_image_fifo(c: Campaign) -> Result:
    from PIL import Image

    folder = c.dir / "fifo_images"
    folder.mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(folder / f"{i}.png")
    if not (folder / "stuck.png").exists():
        os.mkfifo(folder / "stuck.png")
    return user_error(*c.train("fifo", webdataset_path=str(folder)), "stuck.png", "not a regular file")


def case_heldout_corrupt(c: Campaign) -> Result:
    from core.data.tarwrite import write_tar

    shard = write_tar(str(c.dir / "heldout-bad.tar"), [(f"{i:04d}", {"png": b"not an image", "txt": b"x"})
                                                          for i in range(3)])
    code, out = c.train("heldout", validation_webdataset_path=shard)
    result = user_error(code, out, "validation_webdataset_path")
    if "check webdataset_path" in result.message:
        result.ok, result.outcome = False, "blamed on webdataset_path"
    return result


def _validate_only(c: Campaign, *fragments: str, **overrides) -> Result:
    return user_error(*c.train("vo", "--validate-only", **overrides), *fragments)


def case_validate_only_pipe(c: Campaign) -> Result:
    return _validate_only(c, "shell pipes", webdataset_path="pipe:cat shard.tar")


def case_validate_only_no_data(c: Campaign) -> Result:
    return _validate_only(c, "'webdataset_path' is required", webdataset_path="null")


def case_validate_only_http_folder(c: Campaign) -> Result:
    return _validate_only(c, "cannot be listed", webdataset_path="http://127.0.0.1:9/data/")


def case_validate_only_missing_path(c: Campaign) -> Result:
    return _validate_only(c, "effnet_checkpoint_path", "file not found",
                          effnet_checkpoint_path=str(c.dir / "no_such_effnet.safetensors"))


def case_validate_only_scheme(c: Campaign) -> Result:
    return _validate_only(c, "unsupported URL scheme", webdataset_path="ftp://host/shard.tar")


def case_validate_only_not_a_tar(c: Campaign) -> Result:
    page = c.dir / "error-page-0000.tar"
    page.write_text("<html>503 Service Unavailable</html>")
    return _validate_only(c, "not a tar shard", webdataset_path=str(page))


def case_lora_merge_strength(c: Campaign) -> Result:
    files = _tiny_files(c)
    return user_error(*c.run(["tools/lora_merge.py", "--base", str(files["base"]), "--lora", str(files["lora_nan"]),
                              "--out", str(c.dir / "merged_s.safetensors"), "--strength", "inf"]), "--strength")


def case_validate_only_placeholders(c: Campaign) -> Result:
    code, out = c.train("vo", "--validate-only", generator_checkpoint_path="/path/to/stage_c.safetensors")
    ok = code == 0 and "config OK" in out and "generator_checkpoint_path=/path/to/stage_c.safetensors" in out
    return Result(ok, "config OK, placeholder listed" if ok else "not listed", code, _short(out.strip().splitlines()[-1]
                                                                                          if out.strip() else ""))


CASES = [
    Case("lr_inf", "config error naming lr", case_lr_inf),
    Case("lr_1e30", "config error naming lr", case_lr_1e30),
    Case("lr_at_bound", "exit 0 with finite weights, or exit != 0 naming the update; never non-finite files",
         case_lr_at_bound),
    Case("disk_full_save", "one line 'No space left on device', exit != 0, latest = previous, no temp files",
         case_disk_full),
    Case("read_only_mid_run", "one line 'Read-only file system', exit != 0, latest complete, no temp files",
         case_read_only),
    Case("truncated_optimizer", "resume falls back to the previous complete state", case_truncated_optimizer),
    Case("garbage_trainer_json", "resume falls back to the previous complete state", case_garbage_trainer_json),
    Case("png_16bit", "mid-grey 16-bit PNG decodes to 0.5", _probe_case("png16")),
    Case("tar_non_octal_size", "bad shard reported (URL, offset), other shards used", _probe_case("tar_non_octal")),
    Case("png_1bit_20000", "counted as bad data, small peak memory", _probe_case("png_1bit_huge")),
    Case("duplicate_yaml_key", "config error naming the key", case_duplicate_key),
    Case("empty_experiment_id", "config error naming experiment_id", case_empty_experiment_id),
    Case("batch_size_1e12", "config error with the bound", case_batch_size),
    Case("num_workers_100000", "config error against the CPU count", case_num_workers),
    Case("image_size_1e9", "config error with the bound", case_image_size),
    Case("expensive_filter", "config error naming dataset_filters", case_expensive_filter),
    Case("missing_clip_folder", "one-line error naming the folder", case_missing_clip),
    Case("int_dtype_generator", "one-line error naming the file", case_int_generator),
    Case("shard_missing_mid_epoch", "logged when it happens (URL, reason)", _probe_case("shard_missing")),
    Case("summary_counts", "emitted + waiting + filtered + bad = read", _probe_case("summary_counts")),
    Case("file_modes", "files follow the umask (0644 under 022)", case_file_modes),
    Case("missing_models_file", "error names bash models/download_models.sh", case_missing_models_file),
    Case("controlnet_no_control", "sampling error asking for --control-image", case_controlnet_no_control),
    # round three (issue 28)
    Case("wandb_refused", "WANDB_BASE_URL refused: one warning, offline, the run finishes", case_wandb_refused),
    Case("wandb_no_key", "no API key: one warning naming wandb, the run finishes", case_wandb_no_key),
    Case("metrics_restart", "restart without checkpoint: metrics.jsonl holds this run's updates only",
         case_metrics_restart),
    Case("lora_merge_nan", "one line naming the LoRA file and tensor, nothing written", case_lora_merge_nan),
    Case("kohya_inconsistent_ranks", "one line: the file is inconsistent (not 'set rank')", case_kohya_ranks),
    Case("nan_input_generator", "one line naming the input file at load (not the lr)", case_nan_generator),
    Case("diffusers_no_config", "one line: folder without config.json refused", case_diffusers_no_config),
    Case("diffusers_damaged_stage_c", "one line naming Stage C and the missing tensor", case_diffusers_damaged_c),
    Case("image_folder_fifo", "one line: not a regular file (no hang)", case_image_fifo),
    Case("heldout_corrupt", "one line naming validation_webdataset_path", case_heldout_corrupt),
    Case("validate_only_pipe", "--validate-only refuses pipe:", case_validate_only_pipe),
    Case("validate_only_no_data", "--validate-only: webdataset_path required", case_validate_only_no_data),
    Case("validate_only_http_folder", "--validate-only: HTTP folder cannot be listed", case_validate_only_http_folder),
    Case("validate_only_missing_file", "--validate-only: a missing input file named", case_validate_only_missing_path),
    Case("validate_only_placeholders", "--validate-only: OK, placeholders listed", case_validate_only_placeholders),
    Case("validate_only_scheme", "--validate-only: unsupported URL scheme named", case_validate_only_scheme),
    Case("validate_only_not_a_tar", "--validate-only: a shard that is no tar named", case_validate_only_not_a_tar),
    Case("lora_merge_strength_inf", "one line: --strength must be finite", case_lora_merge_strength),
]


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _table(rows: list[tuple[str, str, str, str, str]]) -> str:
    header = ("case", "expected", "observed", "exit", "message")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(row[i].ljust(widths[i]) for i in range(4)) + "  " + row[4])
        if row is header:
            lines.append("  ".join("-" * w for w in widths) + "  -------")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds per case")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--probe", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--assets", help="use these tiny demo assets (tools/make_demo_assets.py layout at 64 px) "
                                          "instead of building them")
    args = parser.parse_args(argv)

    if args.probe:
        name, folder = args.probe
        print("PROBE " + json.dumps(PROBES[name](Path(folder))), flush=True)
        return 0
    if args.list:
        for case in CASES:
            print(f"{case.name}: {case.expected}")
        return 0
    wanted = set(args.only.split(",")) if args.only else None
    unknown = (wanted or set()) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; see --list")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fault_campaign_"))
    folder.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(folder, args.timeout)
    try:
        if args.assets:
            campaign.assets = Path(args.assets).resolve()
        else:
            print(f"building tiny assets in {folder} ...", flush=True)
            campaign.build_assets()
        rows, failed = [], []
        for case in CASES:
            if wanted and case.name not in wanted:
                continue
            start = time.time()
            try:
                result = case.run(campaign)
            except Exception as exc:  # noqa: BLE001 - a broken case is a failed case, the table goes on
                result = Result(False, "campaign error", None, f"{type(exc).__name__}: {exc}")
            status = "skip" if result.ok is None else "PASS" if result.ok else "FAIL"
            if result.ok is False:
                failed.append(case.name)
            rows.append((case.name, case.expected, f"{status}: {result.outcome}",
                         "-" if result.code is None else str(result.code), _short(result.message)))
            print(f"[{status}] {case.name} ({time.time() - start:.0f}s): {result.outcome}", flush=True)
        print()
        print(_table(rows))
        print()
        print(f"{len(rows) - len(failed)} of {len(rows)} cases as expected"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
