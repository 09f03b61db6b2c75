"""Faults around the training state (issue 13, classes 1-3 and file modes): a model with
non-finite values is never written; I/O errors while saving or logging are one line naming the
file and the OS reason, with `latest` kept; a state folder that cannot be read is skipped for the
next older one; files follow the process umask. Real runs of the tiny Stage C job, real files,
real kernel errors (a file size limit; a tiny tmpfs in a user namespace where one can be made)."""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import CheckpointManager, find_resume
from core.errors import UserError
from fileio.atomic import atomic_torch_save

ROOT = Path(__file__).resolve().parents[1]
C_CONFIG = str(ROOT / "configs/training/tiny_c.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


def run_args(assets: Path, run_root: Path, **extra) -> list[str]:
    """The tiny Stage C config pointed at the shared training assets and ``run_root``."""
    values = {
        "webdataset_path": str(assets / "shards"),
        "effnet_checkpoint_path": str(assets / "effnet_encoder.safetensors"),
        "previewer_checkpoint_path": str(assets / "previewer.safetensors"),
        "clip_text_model_name": str(assets / "clip/text"),
        "clip_image_model_name": str(assets / "clip/vision"),
        "checkpoint_path": str(run_root / "ck"), "output_path": str(run_root / "out"),
        "image_size": 64, "batch_size": 2, "num_workers": 0, "log_every": 1, "warmup_updates": 1,
        "preview_every": 0, "num_preview_images": 2,
    }
    values.update(extra)
    out = [C_CONFIG]
    for key, value in values.items():
        out += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return out


def train_c(args: list[str]) -> int:
    from train.train_c import StageCTrainer

    return StageCTrainer.main(args)


def child_env(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **extra)


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of an interrupted or failed save under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp")
                  or p.name.startswith(".tmp"))


# --------------------------------------------------------------- 1. non-finite model never written
def test_exploding_lr_stops_at_the_first_update_and_writes_no_checkpoint(train_assets, tmp_path):
    """The issue's example: lr 1e30 with fewer updates than max_nonfinite_steps used to exit 0 with
    exploded weights. The config check refuses such an lr; the weight guard must hold without it,
    so the lr is set after the config was loaded."""
    from core.config import load_config
    from core.distributed import init_distributed
    from train.train_c import StageCTrainer

    args = run_args(train_assets, tmp_path, experiment_id="boom", updates=2, save_every=1)
    overrides = [args[i + 1] for i in range(1, len(args), 2)]
    cfg = load_config(StageCTrainer.Config, C_CONFIG, overrides)
    cfg.lr = 1e30
    trainer = StageCTrainer(cfg, dist=init_distributed())
    try:
        with pytest.raises(UserError, match=r"^update 1 made the trained weights non-finite or exploded") as err:
            trainer.run()
    finally:
        trainer.close()
    assert "no checkpoint was written" in str(err.value) and "\n" not in str(err.value)
    run = tmp_path / "ck" / "boom"
    assert not (run / "latest").exists() and not (run / "generator.safetensors").exists()
    assert not list((run / "state").iterdir())


def test_nan_weights_mid_run_stop_with_one_line_and_latest_keeps_the_previous_checkpoint(train_assets, tmp_path,
                                                                                         monkeypatch):
    """In-process (UserError is what the CLI prints as one line with exit 2: test_train_errors.py)."""
    monkeypatch.setenv("CASCADE_TRAIN_NAN_WEIGHTS", "3")
    with pytest.raises(UserError) as err:
        train_c(run_args(train_assets, tmp_path, experiment_id="nanw", updates=4, save_every=2))
    message = str(err.value)
    assert message.startswith("update 3 made the trained weights non-finite or exploded") and "\n" not in message
    assert "`latest` still names update 2" in message
    run = tmp_path / "ck" / "nanw"
    assert (run / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in (run / "state").iterdir()) == ["step_00000002"]
    weights = load_file(run / "generator.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_save_with_nonfinite_state_is_refused_before_anything_is_written(tmp_path):
    from core.checkpoint import refuse_nonfinite
    from core.state import StateRegistry, ValueState, first_nonfinite, weights_finite

    registry = StateRegistry()
    registry.register("trainer.json", ValueState(lambda: {"step": 1}, lambda s: None))
    moments = {"state": {0: {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.tensor([1.0, float("inf")])}}}
    registry.register("optimizer.pt", ValueState(lambda: moments, lambda s: None))
    values = registry.snapshot()
    assert registry.nonfinite(values) == "optimizer.pt (state.0.exp_avg_sq)"
    assert first_nonfinite({"a": [torch.ones(2), torch.arange(3)]}) is None  # integer tensors are skipped
    manager = CheckpointManager(str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"update 5: not saving a checkpoint with non-finite values in "
                                        r"optimizer.pt \(state.0.exp_avg_sq\); no checkpoint was written"):
        refuse_nonfinite(registry.nonfinite(values), 5, manager, torch.device("cpu"))
    # the weight guard: NaN, inf and exploded-but-finite floats fail; ordinary weights pass
    assert weights_finite([torch.randn(10, 10), torch.zeros(0), torch.ones(3, dtype=torch.bfloat16)])
    assert not weights_finite([torch.ones(3), torch.tensor([float("nan")])])
    assert not weights_finite([torch.full((4,), 1e30)])


# ------------------------------------------------------------------ 2. I/O errors while saving
def test_save_beyond_the_file_size_limit_is_one_line_and_keeps_latest(train_assets, tmp_path):
    """A real EFBIG from the kernel (RLIMIT_FSIZE in the child): the checkpoint of update 3 cannot
    be written; the previous one stays `latest`, no temporary file is left."""
    first = run_args(train_assets, tmp_path, experiment_id="fsize", updates=2, save_every=2)
    assert train_c(first) == 0
    run = tmp_path / "ck" / "fsize"
    sizes = {p.name: p.stat().st_size for p in (run / "state" / "step_00000002").iterdir()}
    small = max(sizes["trainer.json"], (run / "metrics.jsonl").stat().st_size, (run / "loss.png").stat().st_size)
    limit = 4 * small  # room for the logs and small state files, not for the model file
    assert sizes["generator.safetensors"] > limit, sizes

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = run_args(train_assets, tmp_path, experiment_id="fsize", updates=4, save_every=1)
    proc = subprocess.run([sys.executable, "train/train_c.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=child_env(), preexec_fn=limit_file_size, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot save the checkpoint of update 3 (`latest` still names update 2"), last
    assert re.search(r"/state/step_00000003\.tmp/\w+\.(pt|safetensors): File too large; .*ulimit -f", last), last
    assert (run / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in (run / "state").iterdir()) == ["step_00000002"]
    assert leftovers(run) == []


NAMESPACE_CHILD = textwrap.dedent("""
    import json, os, subprocess, sys
    import torch
    from fileio.errors import WriteError
    from core.checkpoint import CheckpointManager
    from core.logging import RunLogger
    from core.state import StateRegistry, ValueState

    full, readonly = sys.argv[1], sys.argv[2]
    out = {}

    def state(n):  # what a run saves: tensors through torch.save, a safetensors model, json
        reg = StateRegistry()
        reg.register("generator.safetensors", ValueState(lambda: {"w": torch.ones(n)}, None), publish=True)
        reg.register("optimizer.pt", ValueState(lambda: {"state": {0: {"exp_avg": torch.ones(n)}}}, None))
        reg.register("trainer.json", ValueState(lambda: {"step": 1}, None))
        return reg.writers(reg.snapshot())

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except WriteError as exc:
            out[name] = str(exc)

    # disk full: the first save fits the 1 MiB file system, the second does not (its optimizer
    # state fills the disk; then its model file alone)
    manager = CheckpointManager(os.path.join(full, "run"))
    manager.save(1, *state(1000))
    attempt("enospc_torch", lambda: manager.save(2, {}, {"optimizer.pt": state(400_000)[1]["optimizer.pt"]}))
    attempt("enospc_safetensors", lambda: manager.save(2, {"generator.safetensors": state(400_000)[0]["generator.safetensors"]}, {}))
    out["enospc_latest"] = manager.latest_step()
    # remounted read-only in the middle of a run
    manager = CheckpointManager(os.path.join(readonly, "run"))
    manager.save(1, *state(1000))
    logger = RunLogger(os.path.join(readonly, "run"), None, True, total_steps=3)
    logger.log(1, {"loss": 1.0})
    subprocess.run(["mount", "-o", "remount,ro", readonly], check=True)
    attempt("erofs_save", lambda: manager.save(2, *state(1000)))
    attempt("erofs_log", lambda: logger.log(2, {"loss": 0.5}))
    out["erofs_latest"] = manager.latest_step()
    logger.close()
    print(json.dumps(out))
""")


def _user_namespace_tmpfs_works(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                            capture_output=True, timeout=30)
    return result.returncode == 0


def test_disk_full_and_read_only_file_system_name_the_file_and_keep_latest(tmp_path):
    """Real ENOSPC and EROFS: tiny tmpfs mounts in a private mount namespace (skipped where user
    namespaces are not allowed)."""
    if not _user_namespace_tmpfs_works(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    full, readonly = tmp_path / "full", tmp_path / "readonly"
    full.mkdir()
    readonly.mkdir()
    script = tmp_path / "child.py"
    script.write_text(NAMESPACE_CHILD)
    shell = (f"mount -t tmpfs -o size=1m tmpfs {full} && mount -t tmpfs -o size=4m tmpfs {readonly} && "
             f"exec {sys.executable} {script} {full} {readonly}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True,
                          env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("enospc_torch", "enospc_safetensors"):
        assert out[key] is not None and "\n" not in out[key], key
        assert out[key].startswith("cannot save the checkpoint of update 2 (`latest` still names update 1"), out[key]
        assert "No space left on device" in out[key] and "free disk space" in out[key], out[key]
    assert "step_00000002.tmp/optimizer.pt: No space" in out["enospc_torch"]
    assert "step_00000002.tmp/generator.safetensors: No space" in out["enospc_safetensors"]
    assert out["enospc_latest"] == 1
    assert "Read-only file system" in out["erofs_save"] and "`latest` still names update 1" in out["erofs_save"]
    assert out["erofs_log"].startswith("cannot log update 2: ") and "metrics.jsonl: Read-only file system" in out["erofs_log"]
    assert out["erofs_latest"] == 1


def test_os_reasons_of_torch_and_safetensors_writers(tmp_path):
    """torch's zip writer reports a full disk as "unexpected pos"; the reason is recovered from the
    file object's error (real ENOSPC from /dev/full)."""
    from fileio.atomic import os_error_of
    from fileio.errors import WriteError

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(Exception) as err:  # RuntimeError: unexpected pos (or the OSError of the final flush)
        with open("/dev/full", "wb") as fh:
            torch.save({"t": torch.zeros(1 << 16)}, fh)
    assert os_error_of(err.value).strerror == "No space left on device"
    assert os_error_of(RuntimeError("Error while serializing: I/O error: (os error 30)")).strerror == "Read-only file system"
    assert os_error_of(RuntimeError("disk full")) is None  # no OS error: not guessed
    message = str(WriteError("/x/optimizer.pt", 28))
    assert message == "/x/optimizer.pt: No space left on device; free disk space (or raise the quota) and run the same command again"


# ------------------------------------------------------------- 3. resume from the last good folder
def test_resume_skips_broken_folders_and_continues_exactly(train_assets, tmp_path, caplog):
    """The newest folder has a truncated optimizer.pt, the one before a garbage trainer.json: the
    resume warns about each file, uses update 1, and ends with the weights of the run that never
    broke (bitwise)."""
    args = run_args(train_assets, tmp_path, experiment_id="broken", updates=3, save_every=1, keep_last=3)
    assert train_c(args) == 0
    run = tmp_path / "ck" / "broken"
    straight = load_file(run / "generator.safetensors")
    optimizer = run / "state" / "step_00000003" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    trainer = run / "state" / "step_00000002" / "trainer.json"
    trainer.write_bytes(b"{" + b"#" * (trainer.stat().st_size - 1))  # garbage of the recorded size
    caplog.set_level(logging.WARNING)
    assert train_c(args) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping the checkpoint" in r.getMessage()]
    assert len(skipped) == 2, skipped
    assert "update 3" in skipped[0] and str(optimizer) in skipped[0] and "truncated" in skipped[0]
    assert "update 2" in skipped[1] and "trainer.json" in skipped[1] and "unreadable" in skipped[1]
    resumed = load_file(run / "generator.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert CheckpointManager(str(run)).latest_step() == 3


def _save(manager: CheckpointManager, step: int) -> None:
    manager.save(step, {"generator.safetensors": {"w": torch.full((8,), float(step))}},
                 {"optimizer.pt": {"step": step, "t": torch.arange(4)}, "trainer.json": {"step": step},
                  "data.json": {"pos": step}})


def test_missing_garbage_and_truncated_files_fall_back_then_fail_in_one_line(tmp_path, caplog):
    manager = CheckpointManager(str(tmp_path / "run"), keep_last=5)
    for step in (1, 2, 3):
        _save(manager, step)
    state = tmp_path / "run" / "state"
    (state / "step_00000003" / "data.json").unlink()                       # missing
    caplog.set_level(logging.WARNING)
    paths, _ = find_resume("auto", manager)
    assert paths["_dir"].endswith("step_00000002")
    assert "data.json: missing" in caplog.text
    trainer = state / "step_00000002" / "trainer.json"
    trainer.write_text('{"step": "two"}'.ljust(trainer.stat().st_size))     # valid JSON, wrong content
    garbage = state / "step_00000001" / "optimizer.pt"
    garbage.write_bytes(b"x" * garbage.stat().st_size)                          # same size, not a torch file
    with pytest.raises(UserError) as err:
        find_resume("auto", manager)
    message = str(err.value)
    assert "\n" not in message and message.startswith("resume: no loadable checkpoint in ")
    assert "step_00000003/data.json: missing" in message
    assert "step_00000002/trainer.json: 'step' must be a non-negative integer" in message
    assert "step_00000001/optimizer.pt: not a complete torch file" in message
    assert "--resume never" in message
    with pytest.raises(UserError, match=r"--resume .*step_00000001: cannot restore .*optimizer.pt: not a complete"):
        find_resume(str(state / "step_00000001"), manager)


def test_folders_saved_before_the_manifest_still_resume(tmp_path):
    manager = CheckpointManager(str(tmp_path / "run"))
    _save(manager, 4)
    (tmp_path / "run" / "state" / "step_00000004" / "COMPLETE").write_text("4\n")  # the old marker
    paths, _ = find_resume("auto", manager)
    assert paths["_dir"].endswith("step_00000004")


def test_restore_errors_name_the_file_without_a_traceback(tmp_path):
    from core.state import StateRegistry

    class Strict:
        def state_dict(self):
            return {"a": 1}

        def load_state_dict(self, state):
            raise KeyError("param_groups")

    atomic_torch_save({"b": 2}, str(tmp_path / "scheduler.pt"))
    registry = StateRegistry()
    registry.register("scheduler.pt", Strict())
    with pytest.raises(UserError, match=r"^resume: cannot restore .*scheduler.pt into this run \(KeyError"):
        registry.restore({"scheduler.pt": str(tmp_path / "scheduler.pt")}, str(tmp_path))
    registry = StateRegistry()
    registry.register("trainer.json", Strict(), required=True)
    with pytest.raises(UserError, match="trainer.json is missing from the checkpoint"):
        registry.restore({"other.pt": "x"}, str(tmp_path))


# ----------------------------------------------------------------------------- 4. file modes
@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_files_are_created_with_the_process_umask(tmp_path, umask):
    from fileio.atomic import atomic_json, atomic_write_bytes
    from core.logging import RunLogger
    from fileio.state_dicts import save_safetensors

    old = os.umask(umask)
    try:
        manager = CheckpointManager(str(tmp_path / "run"))
        _save(manager, 1)
        manager.backup(1, ["generator.safetensors"])
        save_safetensors({"w": torch.ones(2)}, tmp_path / "model.safetensors")
        atomic_torch_save({"w": torch.ones(2)}, str(tmp_path / "x.pt"))
        atomic_json({"a": 1}, str(tmp_path / "x.json"))
        atomic_write_bytes(str(tmp_path / "x.bin"), b"x")
        logger = RunLogger(str(tmp_path / "run"), None, True, total_steps=1)
        logger.log(1, {"loss": 1.0})
        logger.close()
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(expected)}, modes
