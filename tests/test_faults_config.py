"""Fault class 5 (config) and the config-side points of classes 1 and 6 (issue 13): bad input ends in
ONE line naming the key (exit 2, no traceback), never in a run that trains on absurd values.

One test per class: duplicate YAML keys, count bounds, lr, run ids, the filter grammar's cost bound,
every user-error class reaching the one-line printer, the missing CLIP folder, an int-dtype
generator tensor, the download hint of official files, ControlNet sampling without a control
image, and the mode of written model files.
"""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_e2e import C_CONFIG, config_args, subprocess_env
from tests.test_train_errors import assert_one_clear_line, run_in_process
from tests.helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(train_assets):
    return train_assets


def _run(assets: Path, tmp_path: Path, capsys, *extra: str, config: str = C_CONFIG, **overrides) -> tuple[int, str]:
    return run_in_process([*config_args(config, assets, tmp_path, **overrides), *extra], capsys)


# --- duplicate keys ---------------------------------------------------------------------------
def test_duplicate_yaml_key_is_an_error_naming_key_and_lines(assets, tmp_path, capsys):
    text = Path(C_CONFIG).read_text()
    lines = text.splitlines()
    lr_line = next(i for i, line in enumerate(lines, 1) if line.startswith("lr:"))
    config = tmp_path / "dup.yaml"
    config.write_text(text + "lr: 5.0e-2\n")
    code, err = _run(assets, tmp_path, capsys, config=str(config))
    assert_one_clear_line(code, err, "dup.yaml", f"line {len(lines) + 1}", "'lr' is set twice",
                          f"first at line {lr_line}")


def test_duplicate_key_in_nested_mapping_and_inference_config(tmp_path):
    from core.config_types import DuplicateKey, load_yaml_unique
    from core.errors import UserError
    from inference.config import load_inference_config

    with pytest.raises(DuplicateKey, match="'x' at line 3"):
        load_yaml_unique("a:\n  x: 1\n  x: 2\n")
    assert load_yaml_unique("base: &b {x: 1}\nc:\n  <<: *b\n  y: 2\n")["c"] == {"x": 1, "y": 2}
    path = tmp_path / "inf.yaml"
    path.write_text("stage: c\nmodel_version: tiny\nmodel_version: 1B\n")
    with pytest.raises(UserError, match="line 3: key 'model_version' is set twice"):
        load_inference_config(path)


# --- count bounds -------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, fragments", [
    ("num_workers", 100000, ["num_workers", "100000", f"{os.cpu_count()} CPUs"]),
    ("batch_size", 10 ** 12, ["'batch_size'", "GLOBAL batch"]),
    ("batch_size", "1e12", ["'batch_size'", "whole number"]),
    ("image_size", 10 ** 9, ["image_size", "above 8192"]),
    ("updates", 10 ** 9, ["'updates'", "8 digits"]),
    ("shuffle_buffer", 10 ** 9, ["shuffle_buffer", "in memory"]),
    ("num_preview_images", 10 ** 6, ["'num_preview_images'", "above 256"]),
])
def test_absurd_counts_are_refused_with_the_reason(assets, tmp_path, capsys, key, value, fragments):
    code, err = _run(assets, tmp_path, capsys, **{key: value})
    assert_one_clear_line(code, err, *fragments)


# --- lr -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, fragment", [
    (".inf", "finite"), (".nan", "finite"), ("1e30", "above 1"), ("2.0", "above 1"), ("0", "> 0"),
    ("-1.0e-4", "> 0"),
])
def test_lr_must_be_finite_positive_and_at_most_one(assets, tmp_path, capsys, value, fragment):
    code, err = _run(assets, tmp_path, capsys, "--set", f"lr={value}")
    assert_one_clear_line(code, err, "'lr'", fragment)


def test_other_float_keys_refuse_non_finite_values(assets, tmp_path, capsys):
    code, err = _run(assets, tmp_path, capsys, "--set", "grad_clip=.inf")
    assert_one_clear_line(code, err, "'grad_clip'", "finite")


# --- ids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, fragment", [
    ('""', "is empty"), ("..", "'..'"), ("a/b", "path separator"), ('" run"', "space"),
    ("x" * 201, "bytes long"),
])
def test_experiment_id_must_be_one_folder_name(assets, tmp_path, capsys, value, fragment):
    code, err = _run(assets, tmp_path, capsys, "--set", f"experiment_id={value}")
    assert_one_clear_line(code, err, "'experiment_id'", fragment)
    assert not (tmp_path / "ck" / "config.yaml").exists()


# --- filter grammar ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, fragment", [
    ("lambda s: 'x' * 100000000000 == s", "'*' with a string or list operand"),
    ("lambda s: [0] * 100000000000 == s", "'*' with a string or list operand"),
    ("lambda s: '%999999999d' % s == s", "'%' with a string or list operand"),
    ("lambda s: s ** 10 ** 10 > 1", "'**' is not allowed"),
    ("lambda s: " + "not " * 400 + "s", "characters long"),
])
def test_filter_with_unbounded_cost_is_refused_at_config_time(assets, tmp_path, capsys, text, fragment):
    import json

    code, err = _run(assets, tmp_path, capsys, "--set", f"dataset_filters={json.dumps([['aesthetic', text]])}")
    assert_one_clear_line(code, err, "dataset_filters[0]", fragment)


def test_filter_repetition_of_a_sample_value_is_bounded_at_evaluation():
    from core.data.filters import parse_filter

    rule = parse_filter(["k", "lambda s: s * 100000000000 > 0"])
    assert rule(2) is True
    with pytest.raises(TypeError, match="needs numbers"):  # counted as filtered, never allocated
        rule("x")


# --- every user-fixable error class reaches the one-line printer -------------------------------
# Exception classes that are NOT user errors, and why (each must be converted where it is raised
# on user input, or never escape to the command line).
INTERNAL = {
    "core.config_types.TypeMismatch": "reworded by load_config into a UserError naming the key",
    "core.config_types.DuplicateKey": "reworded by core.config._read_yaml into a UserError",
    "inference.config._DuplicateKey": "reworded by load_inference_config into a UserError",
    "core.data.filters._Rejected": "reworded by parse_lambda into a DataError",
    "core.data.tensors.BadTensors": "a bad sample: counted and reported (DataError when strict)",
    "core.data.captions.MissingCaption": "a bad sample: counted and reported (DataError when strict)",
    "core.data.images.BadImage": "a bad sample: counted and reported (DataError when strict)",
    "core.data.tario.TarTruncated": "a bad shard: counted and reported (DataError when strict)",
    "modules.filters.common.FilterError": "the jobs and inference.control convert it into a UserError",
    "modules.filters.common.MissingDependencyError": "a FilterError (same conversion)",
}
PACKAGES = ("core", "fileio", "modules", "inference", "tools", "train")


def _exception_classes() -> list[str]:
    """Every class defined in the packages that derives from an exception class (by the AST)."""
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in tree.body:
                bases = [ast.unparse(b) for b in getattr(node, "bases", [])]
                if isinstance(node, ast.ClassDef) and any(b.endswith(("Error", "Exception", "Mismatch"))
                                                          or "Error" in b for b in bases):
                    names.append(f"{module}.{node.name}")
    return names


def test_every_exception_class_is_a_user_error_or_documented_internal():
    from core.errors import is_user_error_class

    found = _exception_classes()
    assert "fileio.errors.CheckpointError" in found and "core.data.errors.DataError" in found
    unclassified = []
    for name in found:
        module, cls_name = name.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), cls_name)
        if name in INTERNAL:
            continue
        assert issubclass(cls, BaseException), name
        if not is_user_error_class(cls):
            unclassified.append(name)
    assert not unclassified, f"not user errors and not listed in INTERNAL: {unclassified}"
    assert set(INTERNAL) <= set(found), set(INTERNAL) - set(found)


USER_ERROR_CLASSES = [
    "core.errors.UserError", "fileio.errors.CheckpointError", "modules.loading.StateDictMismatchError",
    "modules.lora_formats.LoraFormatError", "modules.lora_tokens.TrainTokensError", "modules.adapters.errors.AdapterError",
    "modules.conditioning.ClipModelNotFoundError", "core.data.errors.DataError", "core.data.errors.ShardMissing",
]


@pytest.mark.parametrize("name", USER_ERROR_CLASSES)
def test_user_error_class_prints_one_line(name, capsys):
    from core.errors import run_cli

    module, cls_name = name.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)

    def main(argv):
        raise cls("what went wrong\nwhere: some/file.safetensors")

    with pytest.raises(SystemExit) as info:
        run_cli(main, [])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.strip() == "error: what went wrong where: some/file.safetensors"


# --- missing CLIP folder, int-dtype generator tensor ----------------------------------------------
def test_missing_clip_folder_is_one_line(assets, tmp_path, capsys):
    missing = tmp_path / "no_clip"
    code, err = _run(assets, tmp_path, capsys, clip_text_model_name=str(missing), updates=1, save_every=1)
    assert_one_clear_line(code, err, "CLIP", str(missing), "does not exist")


def test_int_dtype_generator_tensor_is_one_line(assets, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from modules.registry import build_model

    sd = {k: v.contiguous() for k, v in build_model("stage_c", "tiny").state_dict().items()}
    first = next(iter(sd))
    sd[first] = sd[first].to(torch.int32)
    path = tmp_path / "int_generator.safetensors"
    save_file(sd, str(path))
    code, err = _run(assets, tmp_path, capsys, generator_checkpoint_path=str(path), updates=1, save_every=1)
    assert_one_clear_line(code, err, "int_generator.safetensors", f"'{first}'", "torch.int32", "floating point")


# --- missing official file: the download command ----------------------------------------------
def test_missing_official_file_names_the_download_command(assets, tmp_path, capsys):
    code, err = _run(assets, tmp_path, capsys, effnet_checkpoint_path="models/effnet_encoder.safetensors")
    assert_one_clear_line(code, err, "effnet_checkpoint_path", "bash models/download_models.sh")
    from fileio.errors import CheckpointError
    from fileio.state_dicts import read_state_dict

    with pytest.raises(CheckpointError, match="download_models.sh"):
        read_state_dict(tmp_path / "models" / "stage_c_bf16.safetensors")
    with pytest.raises(CheckpointError, match="check the path"):
        read_state_dict(tmp_path / "mine.safetensors")


# --- ControlNet sampling without a control image ---------------------------------------------
def test_controlnet_sampling_without_control_image_is_an_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "inference.sample", "--config", "configs/inference/tiny_c.yaml",
         "--set", "controlnet_filter=CannyFilter", "--set", "controlnet_blocks=[0, 2]",
         "--set", "controlnet_checkpoint_path=cnet.safetensors", "--prompt", "a house",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--control-image" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


# --- written model files follow the umask ------------------------------------------------------
def test_model_files_are_created_with_the_process_umask(tmp_path):
    import torch

    from fileio.state_dicts import save_safetensors

    old = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
        os.umask(0o077)
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


# --- the fault script ------------------------------------------------------------------------------
def test_fault_campaign_lists_every_class_and_runs_a_case(assets, tmp_path, capsys):
    from tools import fault_campaign

    names = {case.name for case in fault_campaign.CASES}
    assert {"lr_1e30", "disk_full_save", "truncated_optimizer", "png_16bit", "duplicate_yaml_key",
            "shard_missing_mid_epoch", "controlnet_no_control"} <= names
    code = fault_campaign.main(["--only", "duplicate_yaml_key", "--keep", str(tmp_path / "c"),
                                "--assets", str(assets)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[PASS] duplicate_yaml_key" in out and "is set twice" in out
