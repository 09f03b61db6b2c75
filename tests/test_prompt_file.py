"""The prompt-file parser (kohya lines and YAML lists) shared by previews and inference.sample."""
import pytest

from core.errors import UserError
from inference.prompts import PromptSpec, parse_prompt_line, read_prompt_file

GOOD = [
    ("a cat", PromptSpec("a cat")),
    ("a cat --w 512 --h 768", PromptSpec("a cat", width=512, height=768)),
    ("a dog on a beach --n blurry, low quality --s 12 --l 4.5 --d 7",
     PromptSpec("a dog on a beach", negative="blurry, low quality", steps=12, cfg=4.5, seed=7)),
    ("  spaced  --d 0  ", PromptSpec("spaced", seed=0)),
    ("a -- b --l 0", PromptSpec("a -- b", cfg=0.0)),           # '--' without a letter is prompt text
    ("x --n", PromptSpec("x", negative="")),                     # empty negative is allowed
]

BAD = [
    ("a cat --w 500", "width expects a multiple of 8"),
    ("a cat --w big", "width expects an integer"),
    ("a cat --h 8192", "height expects a multiple of 8 in 32..4096"),
    ("a cat --s 0", "steps expects an integer in 1..1000"),
    ("a cat --l -1", "cfg expects a number >= 0"),
    ("a cat --l nan", "cfg expects a number >= 0"),
    ("a cat --d -3", "seed expects an integer >= 0"),
    ("a cat --q 3", "unknown option --q"),
    ("a cat --w 512 --w 256", "--w is given twice"),
    ("a cat --s", "--s \\(steps\\) has no value"),
    ("--w 512", "no prompt before them"),
]


@pytest.mark.parametrize("line, spec", GOOD)
def test_good_lines(line, spec):
    assert parse_prompt_line(line) == spec


@pytest.mark.parametrize("line, message", BAD)
def test_bad_lines_name_the_line(line, message, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(f"# header\na fine prompt --w 512\n\n{line}\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"prompts file .*p.txt line 4: .*{message}"):
        read_prompt_file(path)


def test_text_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# c\n\na --d 1\nb --n ugly --w 64\n", encoding="utf-8")
    assert read_prompt_file(path) == [PromptSpec("a", seed=1), PromptSpec("b", negative="ugly", width=64)]


def test_yaml_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- a plain prompt\n- {prompt: b, negative: ugly, width: 64, height: 96, steps: 3, cfg: 2, seed: 5}\n")
    assert read_prompt_file(path) == [PromptSpec("a plain prompt"),
                                      PromptSpec("b", negative="ugly", width=64, height=96, steps=3, cfg=2.0, seed=5)]


@pytest.mark.parametrize("text, message", [
    ("prompt: a\n", "expected a YAML list"),
    ("- {prompt: a, size: 3}\n", "item 1: unknown key\\(s\\) size"),
    ("- a\n- {negative: b}\n", "item 2: has no 'prompt'"),
    ("- {prompt: a, width: 33}\n", "item 1: width expects a multiple of 8"),
    ("- [a, b]\n", "item 1: expected a prompt string or a mapping"),
    ("- a\n  - b: [\n", "not valid YAML"),
    ("[]\n", "holds no prompt"),
])
def test_bad_yaml(text, message, tmp_path):
    path = tmp_path / "p.yml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_prompt_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="prompts file not found"):
        read_prompt_file(tmp_path / "nope.txt")
