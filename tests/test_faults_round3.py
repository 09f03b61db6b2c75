"""Faults, round three (issue 28 defects 2, 4, 5, 6 and issue 26 point 7): no tool writes a
non-finite model, a damaged input is named at load, --validate-only runs the checks of a run's start,
and every message names the real culprit (file, key, tensor, OS reason).

Real files and real code paths throughout: tiny models, real safetensors files, real folders, a FIFO,
the training scripts' own command line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import UserError
from fileio.finite import first_nonfinite_tensor
from fileio.errors import CheckpointError
from fileio.state_dicts import save_safetensors
from tests.test_faults_state import C_CONFIG, run_args, train_c
from tools.loopback import StatusServer

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_stage_c() -> dict[str, torch.Tensor]:
    from modules.registry import build_model

    torch.manual_seed(0)
    return {k: v.detach().clone().contiguous() for k, v in build_model("stage_c", "tiny").state_dict().items()}


def _tiny_lora(rank: int = 2) -> tuple[dict[str, torch.Tensor], dict]:
    """A tiny Stage C LoRA (named layout, non-zero updates) and the parameter shapes."""
    from modules.lora import apply_lora
    from modules.lora_formats import named_state_dict, stage_c_targets
    from modules.registry import build_model

    torch.manual_seed(1)
    loras = apply_lora(build_model("stage_c", "tiny"), [".attn"], rank=rank)
    for _, lora in loras:
        torch.nn.init.normal_(lora.lora_up, std=0.01)
        torch.nn.init.normal_(lora.lora_down, std=0.1)
    _, shapes = stage_c_targets("tiny", [".attn"])
    return named_state_dict(loras, alpha=1.0), shapes


# ------------------------------------------------------------------ the one check
def test_first_nonfinite_tensor_names_the_tensor_and_ignores_large_finite_values():
    weights = {"a": torch.ones(3), "big": torch.full((4,), 1e30), "ids": torch.arange(3),
               "b": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), "c": torch.tensor([float("inf")])}
    assert first_nonfinite_tensor(weights) == "b"  # 1e30 overflows the fused norm but is finite
    assert first_nonfinite_tensor({"a": torch.ones(2), "big": torch.full((2,), 3e38)}) is None


def test_save_safetensors_refuses_nonfinite_before_writing(tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match=r"m\.safetensors: not written: tensor 'w' holds NaN"):
        save_safetensors({"ok": torch.ones(2), "w": torch.tensor([1.0, float("inf")])}, out)
    # a cast that overflows is refused too (float16 ends at 65504)
    with pytest.raises(CheckpointError, match="tensor 'w'"):
        save_safetensors({"w": torch.tensor([1e6])}, out, dtype=torch.float16)
    assert not out.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------ defect 2: lora_merge
@pytest.mark.parametrize("damage", ["nan_up", "inf_alpha"])
def test_lora_merge_refuses_a_nonfinite_lora_and_writes_nothing(tmp_path, damage):
    """Defect 2: a LoRA holding a NaN (or an infinite alpha) gave a merged model with non-finite
    weights and exit 0. Now one line names the LoRA file and the tensor; no output file."""
    from tools.lora_merge import merge_files

    base = tmp_path / "base.safetensors"
    save_file(_tiny_stage_c(), str(base))
    named, _ = _tiny_lora()
    key = next(k for k in named if k.endswith(".lora_up" if damage == "nan_up" else ".alpha"))
    named[key] = named[key].clone().fill_(float("nan") if damage == "nan_up" else float("inf"))
    lora = tmp_path / "lora.safetensors"
    save_file(named, str(lora))
    out = tmp_path / "merged.safetensors"
    with pytest.raises(CheckpointError, match=rf"lora\.safetensors: tensor '{key}' holds NaN or infinite"):
        merge_files(str(base), str(lora), str(out))
    assert not out.exists()


def test_lora_merge_refuses_a_nonfinite_strength(tmp_path, capsys):
    from core.errors import run_cli
    from tools.lora_merge import main

    with pytest.raises(SystemExit) as exc:
        run_cli(main, ["--base", "b.safetensors", "--lora", "l.safetensors", "--out", str(tmp_path / "m.safetensors"),
                       "--strength", "nan"])
    assert exc.value.code == 2 and "--strength must be a finite number" in capsys.readouterr().err


def test_lora_merge_refuses_a_merge_that_overflows_the_output_dtype(tmp_path):
    from tools.lora_merge import merge_files

    base = tmp_path / "base.safetensors"
    save_file(_tiny_stage_c(), str(base))
    named, _ = _tiny_lora()
    for k in named:
        if k.endswith(".lora_up"):
            named[k] = named[k].clone().fill_(1e6)
    save_file(named, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "merged.safetensors"
    with pytest.raises(CheckpointError, match=r"merged\.safetensors: not written: tensor '.*attn"):
        merge_files(str(base), str(tmp_path / "lora.safetensors"), str(out), dtype="float16")
    assert not out.exists()


# ------------------------------------------------------------------ defect 5: NaN input named at load
def test_nan_in_the_input_generator_is_named_at_load_not_blamed_on_lr(train_assets, tmp_path):
    """Defect 5a: a NaN in generator_checkpoint_path trained, then stopped at the first save with
    "lower lr and resume". Now the load names the file and the tensor; nothing is saved."""
    sd = _tiny_stage_c()
    key = list(sd)[5]
    sd[key][0] = float("nan")
    bad = tmp_path / "generator_nan.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointError) as exc:
        train_c(run_args(train_assets, tmp_path, experiment_id="nan_in", updates=2, save_every=1,
                         generator_checkpoint_path=str(bad)))
    message = str(exc.value)
    assert "generator_nan.safetensors" in message and key in message and "lr" not in message, message
    assert not (tmp_path / "ck" / "nan_in" / "latest").exists()


def test_float16_load_that_overflows_is_named_with_the_dtype(tmp_path):
    from modules.loading import load_model

    sd = _tiny_stage_c()
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[key][0] = 1e6
    path = tmp_path / "big.safetensors"
    save_file(sd, str(path))
    load_model("stage_c", "tiny", path)  # finite in float32: loads
    with pytest.raises(CheckpointError, match=rf"big\.safetensors \(as torch.float16\): tensor '{key}'"):
        load_model("stage_c", "tiny", path, dtype=torch.float16)


def test_cache_writer_refuses_a_nonfinite_sample(tmp_path):
    from train.stage_c_cache import CacheWriter

    writer = CacheWriter(tmp_path / "cache", shard_size=4)
    writer.add("ok", {"latents": torch.zeros(2, 2)}, "a caption")
    with pytest.raises(UserError, match="sample 'bad': encoded tensor 'latents' holds NaN"):
        writer.add("bad", {"latents": torch.tensor([float("nan")])}, "a caption")


# ------------------------------------------------------------------ defect 5: diffusers / kohya messages
def test_damaged_stage_c_diffusers_folder_names_stage_c_and_the_tensor(tmp_path):
    """Defect 5b: tools/export_diffusers.py called a damaged Stage C folder "not a Stage B
    checkpoint", naming no tensor."""
    from tools.export_diffusers import export, to_official

    src = tmp_path / "c.safetensors"
    save_file(_tiny_stage_c(), str(src))
    folder = tmp_path / "prior"
    export(str(src), str(folder))
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    lost = next(k for k in sd if k.startswith("down_blocks.0.0"))
    del sd[lost]
    save_file(sd, str(weights))
    with pytest.raises(UserError) as exc:
        to_official(str(folder), str(tmp_path / "back.safetensors"))
    message = str(exc.value)
    assert "Stage C model_version tiny" in message and "Stage B" not in message and "missing keys" in message, message
    assert not (tmp_path / "back.safetensors").exists()


def test_diffusers_folder_without_config_json_is_refused(tmp_path):
    """Defect 6: a diffusers folder without config.json loaded silently (nothing checked the head
    count). It is refused with the reason; the weights file itself still loads as the configured version."""
    from modules.loading import load_model
    from tools.export_diffusers import export

    src = tmp_path / "c.safetensors"
    save_file(_tiny_stage_c(), str(src))
    folder = tmp_path / "prior"
    export(str(src), str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="without config.json: the attention head counts"):
        load_model("stage_c", "tiny", folder)
    load_model("stage_c", "tiny", folder / "diffusion_pytorch_model.safetensors")


def _kohya(tmp_path: Path, damage: str) -> tuple[Path, dict]:
    from modules.lora_formats import entries_from_named, export_kohya

    named, shapes = _tiny_lora()
    kohya = export_kohya(entries_from_named(named), shapes)
    stem = next(k[: -len(".lora_up.weight")] for k in kohya if "out_proj" in k and k.endswith(".lora_up.weight"))
    if damage == "up_only":  # lora_up of rank 1 against a lora_down of rank 2
        kohya[f"{stem}.lora_up.weight"] = kohya[f"{stem}.lora_up.weight"][:, :1].contiguous()
    else:  # one module consistently of rank 1: a file that mixes ranks
        kohya[f"{stem}.lora_up.weight"] = kohya[f"{stem}.lora_up.weight"][:, :1].contiguous()
        kohya[f"{stem}.lora_down.weight"] = kohya[f"{stem}.lora_down.weight"][:1].contiguous()
    path = tmp_path / f"kohya_{damage}.safetensors"
    save_file(kohya, str(path))
    return path, shapes


def test_kohya_lora_with_inconsistent_ranks_is_named_not_told_to_set_rank(tmp_path):
    """Defect 5c: a kohya LoRA with inconsistent ranks was told to "set rank to 3"."""
    from modules.lora import apply_lora
    from modules.lora_formats import load_into_loras, read_entries, read_lora_file
    from modules.registry import build_model
    from tools.lora_merge import merge_files

    path, shapes = _kohya(tmp_path, "up_only")
    base = tmp_path / "base.safetensors"
    save_file(_tiny_stage_c(), str(base))
    with pytest.raises(CheckpointError, match=r"out_proj.*lora_up \(32, 1\) has rank 1 but lora_down \(2, 32\) "
                                              r"has rank 2: the file is inconsistent"):
        merge_files(str(base), str(path), str(tmp_path / "merged.safetensors"))

    mixed, _ = _kohya(tmp_path, "mixed")
    loras = apply_lora(build_model("stage_c", "tiny"), [".attn"], rank=2)
    entries = read_entries(read_lora_file(str(mixed))[0], shapes, source=str(mixed))
    with pytest.raises(CheckpointError) as exc:
        load_into_loras(loras, entries, 1.0, source=str(mixed))
    assert "mixes LoRA ranks (rank 1 at" in str(exc.value) and "set rank to" not in str(exc.value)


# ------------------------------------------------------------------ defect 5: data messages
def test_unreadable_image_is_not_blamed_on_editing_the_folder(tmp_path):
    """Defect 5d: an image the reader cannot open was reported as "do not edit a dataset folder
    during a run". A FIFO named like an image (which would block the reader forever) is refused at
    listing; an open that fails gives the OS reason; only a removed file is an edit."""
    import numpy as np
    from PIL import Image

    from core.data import DataError
    from core.data.imagefolder import ChunkReader, chunk_urls

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    os.mkfifo(folder / "fifo.png")
    with pytest.raises(DataError, match=r"fifo\.png is not a regular file"):
        chunk_urls(str(folder))
    (folder / "fifo.png").unlink()
    url = chunk_urls(str(folder))[0]
    size = (folder / "0.png").stat().st_size
    (folder / "0.png").unlink()  # replaced by a folder of the same name: open gives EISDIR
    (folder / "0.png").mkdir()
    with pytest.raises(DataError) as exc:
        ChunkReader(url).read()
    assert "cannot read 0.png: Is a directory" in str(exc.value) and "do not edit" not in str(exc.value)
    (folder / "0.png").rmdir()
    with pytest.raises(DataError, match="0.png was removed since the folder was listed; do not edit"):
        ChunkReader(url).read()
    assert size > 0


def test_corrupt_held_out_set_names_validation_webdataset_path(train_assets, tmp_path):
    """Defect 5e: a corrupt held-out set said "check webdataset_path and dataset_filters"."""
    from core.data.tarwrite import write_tar

    shard = write_tar(str(tmp_path / "heldout.tar"), [(f"{i:04d}", {"png": b"not an image", "txt": b"x"})
                                                       for i in range(3)])
    with pytest.raises(Exception) as exc:
        train_c(run_args(train_assets, tmp_path, experiment_id="val_bad", updates=2, save_every=2,
                         validation_webdataset_path=shard))
    message = str(exc.value)
    assert "validation_webdataset_path" in message and "check webdataset_path" not in message, message


# ------------------------------------------------------------------ defect 4 and issue 26.7: --validate-only
def _validate(train_assets: Path, tmp_path: Path, capsys, **overrides) -> tuple[int, str, str]:
    from core.errors import run_cli
    from train.train_c import StageCTrainer

    args = run_args(train_assets, tmp_path, experiment_id="vo", updates=2, save_every=2, **overrides)
    try:
        run_cli(StageCTrainer.main, [*args, "--validate-only"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("overrides, needle", [
    ({"webdataset_path": "pipe:cat shard.tar"}, "shell pipes are not supported"),
    ({"webdataset_path": None}, "config key 'webdataset_path' is required"),
    ({"webdataset_path": "http://127.0.0.1:9/data/"}, "an HTTP folder cannot be listed"),
    ({"webdataset_path": "/nonexistent/shards"}, "webdataset_path: none of the 1 shard(s) exists"),
    ({"validation_webdataset_path": "/nonexistent/heldout"}, "validation_webdataset_path: none of the"),
    ({"regularization_webdataset_path": "/nonexistent/reg", "regularization_share": 0.5},
     "regularization_webdataset_path: none of the"),
    ({"effnet_checkpoint_path": "/nonexistent/effnet.safetensors"}, "config key 'effnet_checkpoint_path': file not found"),
    ({"clip_text_model_name": "/nonexistent/clip"}, "config key 'clip_text_model_name': folder not found"),
    ({"crop": "smart", "saliency_model_path": "/nonexistent/sal.pt"}, "'saliency_model_path': file not found"),
    ({"webdataset_path": "ftp://host/shard.tar"}, "unsupported URL scheme 'ftp://'"),
    ({"generator_checkpoint_path": "GARBAGE"}, "config key 'generator_checkpoint_path': "),
    ({"effnet_checkpoint_path": "CONFIG"}, "unsupported checkpoint extension '.yaml'"),
    ({"webdataset_path": "NOT_A_TAR"}, "not a tar shard"),
])
def test_validate_only_refuses_what_the_run_refuses(train_assets, tmp_path, capsys, overrides, needle):
    """Defect 4 (pipe:, no webdataset_path, an HTTP folder) and issue 26.7 (paths that do not exist):
    --validate-only said "config OK" for configs the run refuses at once."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)  # not a safetensors header
    not_a_tar = tmp_path / "shard-0000.tar"
    not_a_tar.write_text("<html>an error page, not a shard</html>")
    named = {None: "null", "GARBAGE": str(garbage), "CONFIG": C_CONFIG, "NOT_A_TAR": str(not_a_tar)}
    overrides = {k: named.get(v, v) for k, v in overrides.items()}
    code, out, err = _validate(train_assets, tmp_path, capsys, **overrides)
    assert code == 2 and "config OK" not in out and err.startswith("error: ") and needle in err, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_validate_only_lists_placeholders_and_official_files(train_assets, tmp_path, capsys):
    code, out, err = _validate(train_assets, tmp_path, capsys, generator_checkpoint_path="/path/to/stage_c.safetensors",
                               stage_b_checkpoint_path="models/stage_b_bf16.safetensors",
                               webdataset_path=json.dumps([str(train_assets / "shards"), "s3://path/to/more"]))
    assert code == 0 and "config OK" in out, err
    listed = out.splitlines()[-1]
    assert listed.startswith("not checked") and "generator_checkpoint_path=/path/to/stage_c.safetensors" in listed
    assert "stage_b_checkpoint_path=models/stage_b_bf16.safetensors" in listed and "s3://path/to/more" in listed


@pytest.fixture
def forbidding_server():
    """An HTTP server on 127.0.0.1 answering 403 to everything (a token it does not accept)."""
    with StatusServer(403) as server:
        yield server.url


def test_validate_only_opens_the_first_shard(train_assets, tmp_path, capsys, forbidding_server):
    """A shard the run cannot open (the server refuses the token): the reader's error, naming the key."""
    code, out, err = _validate(train_assets, tmp_path, capsys,
                               validation_webdataset_path=f"{forbidding_server}/heldout-{{0000..0001}}.tar")
    assert code == 2 and err.startswith("error: validation_webdataset_path:") and "403" in err, err
