"""core.config / core.config_types / core.errors: YAML -> typed dataclass, errors, CLI."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import pytest
import yaml

from core.config import (REQUIRED, RunConfig, config_reference, config_to_dict, doc, load_config,
                         parse_cli, save_config)
from core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "experiment_id": "exp", "checkpoint_path": "/tmp/ck", "output_path": "/tmp/out",
    "lr": 1.0e-4, "batch_size": 8, "updates": 10, "save_every": 5,
}


@dataclass
class ExtraConfig:
    dataset_filters: Optional[list[list[Union[str, int, float, None]]]] = doc(None, "filters")
    train_tokens: list[list[str | None]] = doc([], "tokens")
    mode: Literal["a", "b"] = doc("a", "mode")
    pair: tuple[int, float] = doc((1, 2.0), "pair")
    params: dict[str, float] = doc({}, "params")
    needed: str = doc(REQUIRED, "always required")
    calls: list[str] = doc([], "validator calls (test bookkeeping)")
    weights_checkpoint_path: Optional[str] = doc(None, "a file")
    other_checkpoint_path: Optional[str] = doc(None, "another file")

    def validate_extra(self) -> None:
        self.calls.append("extra")


@dataclass
class Composed(RunConfig, ExtraConfig):
    def validate_script(self) -> None:
        self.calls.append("script")


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def load(tmp_path, data, *overrides, cls=Composed, **kw):
    with_base = issubclass(cls, RunConfig) and issubclass(cls, ExtraConfig)
    return load_config(cls, write(tmp_path, {"needed": "x", **BASE, **data} if with_base else data),
                       list(overrides), **kw)


def test_types_and_nested_shapes(tmp_path):
    cfg = load(tmp_path, {"dataset_filters": [["aesthetic", 5], ["w", 768.0], ["x", None]],
                          "train_tokens": [["[fernando]", "^dog</w>"], ["<x>", None]],
                          "pair": [3, 4], "params": {"a": 1}, "mode": "b", "lr": 1})
    assert cfg.dataset_filters == [["aesthetic", 5], ["w", 768.0], ["x", None]]
    assert cfg.train_tokens[1] == ["<x>", None]
    assert cfg.pair == (3, 4.0) and isinstance(cfg.pair[1], float)
    assert cfg.params == {"a": 1.0} and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.calls == ["extra", "script"]  # every component validator, base components first


def test_yaml11_float_strings_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("needed: x\nexperiment_id: e\ncheckpoint_path: c\noutput_path: o\n"
                    "lr: 1e-4\nbatch_size: 4\nupdates: 3\nsave_every: 1\n")
    cfg = load_config(Composed, str(path), ["lr=2e-5", "batch_size=8", "wandb_project=P", "mode=b"])
    assert cfg.lr == 2e-5 and cfg.batch_size == 8 and cfg.wandb_project == "P" and cfg.mode == "b"


@pytest.mark.parametrize("data, pieces", [
    ({"learning_rate": 1}, ["unknown config key 'learning_rate'"]),
    ({"bach_size": 1}, ["'bach_size'", "did you mean 'batch_size'"]),
    ({"batch_size": "eight"}, ["'batch_size'", "expects int", "'eight'"]),
    ({"batch_size": 8.0}, ["'batch_size'", "expects int"]),
    ({"lr": True}, ["'lr'", "expects float"]),
    ({"mode": "c"}, ["'mode'", "one of 'a', 'b'"]),
    ({"dataset_filters": [["k", {"x": 1}]]}, ["'dataset_filters'", "list[list[str | int | float | None]] | None"]),
    ({"pair": [1, 2, 3]}, ["'pair'", "tuple[int, float]"]),
    ({"use_fsdp": "yes"}, ["'use_fsdp'", "expects bool"]),
    ({"grad_accum_steps": 0}, ["'grad_accum_steps' must be >= 1"]),
])
def test_errors_name_key_and_type(tmp_path, data, pieces):
    with pytest.raises(UserError) as info:
        load(tmp_path, data)
    message = str(info.value)
    assert "\n" not in message
    for piece in pieces:
        assert piece in message, message


def test_required_keys_and_training_flag(tmp_path):
    data = {k: v for k, v in BASE.items() if k != "lr"}
    with pytest.raises(UserError, match="required config key 'lr'"):
        load_config(Composed, write(tmp_path, {"needed": "x", **data}))
    # training: false waives the training-only keys (inference configs), not the always-required ones
    cfg = load_config(Composed, write(tmp_path, {"needed": "x", "training": False}))
    assert cfg.training is False and config_to_dict(cfg)["lr"] is None
    with pytest.raises(UserError, match="'needed'"):
        load_config(Composed, write(tmp_path, {"training": False}))


def test_bool_strings(tmp_path):
    for text, expected in (("True", True), ("false", False), ("TRUE", True)):
        assert load(tmp_path, {"use_fsdp": text}).use_fsdp is expected


def test_official_compat_keys_of_the_stage_jobs(tmp_path, caplog):
    """Stage keys live in the jobs' config (train/cascade.py), not in core's RunConfig."""
    RANDOM_CROP = {"crop": "random", "model_version": "tiny"}  # crop: auto would be SmartCrop (saliency weights)
    from train.cascade import CascadeConfig

    @dataclass
    class Job(CascadeConfig, ExtraConfig):
        pass

    for text, expected in (("True", True), ("false", False)):
        assert load(tmp_path, {**RANDOM_CROP, "adaptive_loss_weight": text}, cls=Job).adaptive_loss_weight is expected
    assert load(tmp_path, {**RANDOM_CROP, "edm_objective": False}, cls=Job).edm_objective is False
    with pytest.raises(UserError, match="edm_objective.*not implemented"):
        load(tmp_path, {**RANDOM_CROP, "edm_objective": True}, cls=Job)
    with caplog.at_level(logging.WARNING):
        cfg = load(tmp_path, {**RANDOM_CROP, "shift": 4}, cls=Job)
    assert cfg.shift == 4.0 and "shift" in caplog.text and "ignored" in caplog.text
    # caption_dropout is the alias users know for text_dropout; both at once is an error
    assert load(tmp_path, {**RANDOM_CROP, "caption_dropout": 0.2}, cls=Job).text_dropout == 0.2
    with pytest.raises(UserError, match="'caption_dropout' and 'text_dropout' are the same setting"):
        load(tmp_path, {**RANDOM_CROP, "caption_dropout": 0.2, "text_dropout": 0.1}, cls=Job)
    with pytest.raises(UserError, match="unknown config key 'adaptive_loss_weight'"):
        load(tmp_path, {"adaptive_loss_weight": True})  # not a key of the generic run config


def test_batch_size_is_global_and_must_divide(tmp_path):
    cfg = load(tmp_path, {"batch_size": 12, "grad_accum_steps": 3})
    cfg.validate_run(2)
    assert cfg.per_rank_batch(2) == 2
    cfg.validate_run(4)  # 12 images = 4 ranks x 3 micro-steps x 1 image
    with pytest.raises(UserError, match=r"GLOBAL batch.*world_size \(8\) x grad_accum_steps \(3\) = 24"):
        cfg.validate_run(8)  # would round down to 0 images per rank in the reference


def test_batch_size_not_divisible(tmp_path):
    cfg = load(tmp_path, {"batch_size": 10, "grad_accum_steps": 3})
    with pytest.raises(UserError, match=r"GLOBAL batch.*= 6; use e.g. batch_size=6 or 12"):
        cfg.validate_run(2)
    with pytest.raises(UserError, match="batch_size"):
        load(tmp_path, {"batch_size": 10, "grad_accum_steps": 3}, world_size=2)


def test_save_load_roundtrip_and_reference(tmp_path):
    cfg = load(tmp_path, {"pair": [5, 6], "dataset_filters": [["w", 1]]})
    out = tmp_path / "saved" / "config.yaml"
    save_config(cfg, str(out))
    again = load_config(Composed, str(out))
    skip = {"calls"}
    assert {k: v for k, v in config_to_dict(again).items() if k not in skip} == \
        {k: v for k, v in config_to_dict(cfg).items() if k not in skip}
    table = config_reference(Composed)
    assert "| `batch_size` | `int` | **required (training)** | GLOBAL batch" in table
    assert "| `needed` | `str` | **required** |" in table


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(RunConfig, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(RunConfig, str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(RunConfig, str(bad))
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(RunConfig, None, ["lr"])


def test_check_file_and_validate_only(tmp_path):
    cfg = load(tmp_path, {"weights_checkpoint_path": "/path/to/effnet.safetensors"}, validate_only=True)
    cfg.check_file("weights_checkpoint_path")  # placeholders allowed in validate-only mode
    cfg = load(tmp_path, {"weights_checkpoint_path": str(tmp_path / "missing.safetensors")})
    with pytest.raises(UserError, match="weights_checkpoint_path.*file not found"):
        cfg.check_file("weights_checkpoint_path")
    with pytest.raises(UserError, match="'other_checkpoint_path' is required"):
        cfg.require("other_checkpoint_path")


def test_parse_cli():
    args = parse_cli(["c.yaml", "--set", "lr=1", "--set", "batch_size=2", "--dry-run", "--resume", "never"])
    assert args.config == "c.yaml" and args.overrides == ["lr=1", "batch_size=2"] == args.set
    assert args.dry_run and not args.validate_only and args.resume == "never"
    assert parse_cli(["c.yaml"]).resume == "auto"
    with pytest.raises(UserError, match="unrecognized arguments"):
        parse_cli(["c.yaml", "--bogus"])


def test_run_cli_exit_codes(tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent("""
        from core.errors import UserError, run_cli
        class DataError(Exception):
            pass
        def main(argv):
            kind = argv[0]
            if kind == "user": raise UserError("bad key 'x'\\nfix it")
            if kind == "data": raise DataError("shard broken")
            if kind == "bug": raise RuntimeError("internal")
            if kind == "int": raise KeyboardInterrupt
            return 0
        run_cli(main)
    """))

    kinds = ("user", "data", "bug", "int", "ok")  # run concurrently: start-up dominates
    procs = {k: subprocess.Popen([sys.executable, str(script), k], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k in kinds}
    done = {k: (p.wait(timeout=60), p.communicate()[1]) for k, p in procs.items()}
    assert done["user"] == (2, "error: bad key 'x' fix it\n")
    assert done["data"] == (2, "error: shard broken\n")
    assert done["bug"][0] == 1 and "Traceback" in done["bug"][1]
    assert done["int"][0] == 130 and done["ok"][0] == 0


def test_config_reference_tool():
    out = subprocess.run([sys.executable, str(ROOT / "tools/config_reference.py"), "core.config:RunConfig"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "| `save_every` |" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools/config_reference.py"), "os:path"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
