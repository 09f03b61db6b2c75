"""Prompt files: one parser for training previews (``preview_prompts_file``) and
``python3 -m inference.sample --prompts-file``.

Two forms:

* a text file, one prompt per line, with kohya sd-scripts' per-prompt options anywhere after the
  prompt, each ``--X value`` (the value runs until the next `` --X``)::

      # comment lines and blank lines are skipped
      a photo of ohwx dog on a beach --w 1024 --h 768 --s 20 --l 4.0 --d 42 --n blurry, lowres

  ``--w`` width, ``--h`` height (multiples of 8, 32..4096), ``--s`` sampling steps (1..1000),
  ``--l`` CFG scale (>= 0), ``--d`` seed (>= 0), ``--n`` negative prompt;
* a YAML file (``.yaml`` / ``.yml``): a list whose items are prompt strings or mappings with the keys
  ``prompt`` (required), ``negative``, ``width``, ``height``, ``steps``, ``cfg``, ``seed``.

An option that is not given is None: the caller's default applies. Any mistake is one
``UserError`` naming the file and the line (or list item).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from inference.errors import UserError

__all__ = ["PromptSpec", "read_prompt_file", "parse_prompt_line", "FLAGS"]

#: kohya flag -> PromptSpec field
FLAGS = {"w": "width", "h": "height", "s": "steps", "l": "cfg", "d": "seed", "n": "negative"}
_OPTION = re.compile(r"(?:^|\s)--([A-Za-z]\w*)(?=\s|$)")
MAX_SIDE = 4096


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and its own sampling settings (None: the caller's default)."""

    prompt: str
    negative: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None
    cfg: Optional[float] = None
    seed: Optional[int] = None

    def settings(self) -> tuple:
        """Everything but the prompt (specs with equal settings can be sampled in one batch)."""
        return (self.negative, self.width, self.height, self.steps, self.cfg, self.seed)


def _check(field: str, value: Any, where: str) -> Any:
    """``value`` converted/checked for ``field``; UserError naming ``where``."""
    def bad(expected: str) -> UserError:
        return UserError(f"{where}: {field} expects {expected}, got {value!r}")

    if field in ("prompt", "negative"):
        if not isinstance(value, str):
            raise bad("text")
        return value.strip()
    if field == "cfg":
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number) or number < 0:
            raise bad("a number >= 0")
        return number
    try:
        number = int(value, 10) if isinstance(value, str) else value
    except ValueError:
        number = None
    if not isinstance(number, int) or isinstance(number, bool):
        raise bad("an integer")
    if field in ("width", "height") and not (32 <= number <= MAX_SIDE and number % 8 == 0):
        raise bad(f"a multiple of 8 in 32..{MAX_SIDE}")
    if field == "steps" and not 1 <= number <= 1000:
        raise bad("an integer in 1..1000")
    if field == "seed" and number < 0:
        raise bad("an integer >= 0")
    return number


def parse_prompt_line(line: str, where: str = "prompt") -> PromptSpec:
    """One kohya-style line -> PromptSpec (``where`` names the line in errors)."""
    matches = list(_OPTION.finditer(line))
    prompt = line[:matches[0].start()] if matches else line
    values: dict[str, Any] = {"prompt": _check("prompt", prompt, where)}
    if not values["prompt"]:
        raise UserError(f"{where}: the line has options but no prompt before them")
    for i, m in enumerate(matches):
        flag = m.group(1)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        value = line[m.end():end].strip()
        if flag not in FLAGS:
            raise UserError(f"{where}: unknown option --{flag} (known: "
                            + ", ".join(f"--{k} {v}" for k, v in FLAGS.items()) + ")")
        field = FLAGS[flag]
        if field in values:
            raise UserError(f"{where}: option --{flag} is given twice")
        if value == "" and field != "negative":
            raise UserError(f"{where}: option --{flag} ({field}) has no value")
        values[field] = _check(field, value, where)
    return PromptSpec(**values)


def _from_yaml(path: Path, text: str) -> list[PromptSpec]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"prompts file {path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, list):
        raise UserError(f"prompts file {path}: expected a YAML list of prompts (strings or mappings with 'prompt')")
    known = [f.name for f in fields(PromptSpec)]
    specs = []
    for i, item in enumerate(data):
        where = f"prompts file {path} item {i + 1}"
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a prompt string or a mapping, got {type(item).__name__}")
        unknown = sorted(set(map(str, item)) - set(known))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
        if "prompt" not in item:
            raise UserError(f"{where}: has no 'prompt'")
        values = {k: _check(k, v, where) for k, v in item.items() if v is not None or k == "prompt"}
        if not values["prompt"]:
            raise UserError(f"{where}: the prompt is empty")
        specs.append(PromptSpec(**values))
    return specs


def read_prompt_file(path: Any) -> list[PromptSpec]:
    """The prompts of a text (kohya lines) or YAML prompt file; UserError naming the line on any mistake."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"prompts file {path}: cannot be read as UTF-8 text ({exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        specs = _from_yaml(path, text)
    else:
        specs = [parse_prompt_line(line.strip(), f"prompts file {path} line {n}")
                 for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise UserError(f"prompts file {path} holds no prompt (one prompt per line, or a YAML list)")
    return specs
