"""Issue 26 point 3: ``--lora PATH[:strength]`` (repeatable); tokens from the LoRA file's
metadata; a config, file or prompt that disagree is an error; a key that would be ignored is an
error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.config import load_inference_config
from inference.errors import UserError
from inference.sample import main, parse_lora_arg
from inference.tokens import check_prompt_tokens
from tools.make_tiny_inference_assets import write_tiny_setup

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "inference"
FAST = ["--height", "64", "--width", "64", "--steps-c", "1", "--no-progress", "--preview-only", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny inference files, plus two LoRA files with metadata as the LoRA trainer writes it:
    one trained '[skitok]', one '[othertok]' (each at the first new id, 49408)."""
    folder = tmp_path_factory.getbasetemp() / "inference_tiny"
    write_tiny_setup(folder)
    sd = load_file(str(folder / "lora_tiny.safetensors"))
    for name, token, init in (("lora_ski.safetensors", "[skitok]", "^cat</w>"),
                              ("lora_other.safetensors", "[othertok]", "^dog</w>")):
        meta = {"train_tokens": json.dumps([[token, init]]), "tokens": json.dumps([token]),
                "token_ids": json.dumps([49408]), "rank": "2", "module_filters": json.dumps([".attn"])}
        save_file(sd, str(folder / name), metadata=meta)
    return folder


def _run(root, tmp_path, *args: str) -> int:
    return main(["--config", str(CONFIGS / "tiny_c.yaml"), "--root", str(root), "--out", str(tmp_path / "o"),
                 *FAST, *args])


def test_lora_flag_parses_path_and_strength():
    assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)


def test_the_issue_case_a_config_naming_other_tokens_is_an_error(root, tmp_path):
    """tiny_lora_c.yaml says [tinytok]; the file was trained with [skitok]: refused, not mixed up."""
    with pytest.raises(UserError, match=r"trained with train_tokens \[\['\[skitok\]'"):
        main(["--config", str(CONFIGS / "tiny_lora_c.yaml"), "--root", str(root), "--out", str(tmp_path / "o"),
              "--lora", "lora_ski.safetensors", "--prompt", "a photo of [skitok] cat", *FAST])


def test_tokens_come_from_the_file_and_a_foreign_trigger_word_is_an_error(root, tmp_path, capsys):
    assert _run(root, tmp_path, "--lora", str(root / "lora_ski.safetensors"), "--prompt", "a [skitok] cat") == 0
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(UserError, match=r"\[tinytok\] looks like a trained token.*\['\[skitok\]'\]"):
        _run(root, tmp_path, "--lora", str(root / "lora_ski.safetensors"), "--prompt", "a [tinytok] cat")
    assert _run(root, tmp_path, "--lora", str(root / "lora_ski.safetensors"), "--prompt", "a cat") == 0
    assert "trained the token [skitok] but no prompt uses it" in capsys.readouterr().err


def test_two_loras_each_with_its_own_new_token(root, tmp_path):
    from inference.pipeline import CascadePipeline

    pipe = CascadePipeline.from_config(
        CONFIGS / "tiny_c.yaml", root=root, progress=False, device="cpu",
        overrides=["loras=[[lora_ski.safetensors, 1.0], [lora_other.safetensors, 0.5]]"])
    assert pipe.lora_tokens == ["[skitok]", "[othertok]"] and len(pipe.loras) == 2
    ski, other = (pipe.tokenizer.convert_tokens_to_ids(t) for t in ("[skitok]", "[othertok]"))
    assert (ski, other) == (49408, 49409)
    # the second file's row (saved at id 49408) moved to the id its token got here
    assert pipe.loras[1].lora.token_indices.tolist() == [49409]
    assert pipe.loras[1].strength == 0.5


def test_ignored_keys_are_errors(root):
    with pytest.raises(UserError, match="'rank', 'train_tokens' apply to a LoRA"):
        load_inference_config(CONFIGS / "tiny_c.yaml", ["rank=4", "train_tokens=[['[a]', null]]"])
    with pytest.raises(UserError, match="cnet_multiplier"):
        load_inference_config(CONFIGS / "tiny_c.yaml", ["cnet_multiplier=0.5"])
    from inference.pipeline import CascadePipeline

    with pytest.raises(UserError, match=r"LoRA rank is \[2\] but the config says rank 4"):
        CascadePipeline.from_config(CONFIGS / "tiny_lora_c.yaml", root=root, progress=False, device="cpu",
                                    overrides=["rank=4"])


def test_a_trigger_word_without_a_lora_is_a_warning():
    assert check_prompt_tokens(["a [skitok] cat"], [], lora_loaded=False)[0].startswith("prompt word [skitok]")
