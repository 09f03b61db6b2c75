#!/usr/bin/env python3
"""Print the markdown reference table of a config dataclass.

Usage: python3 tools/config_reference.py core.config:RunConfig [module:Class ...] > docs/CONFIG.md
The class is imported by name (importlib + getattr), never evaluated.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import NoReturn

from core.config import config_reference
from core.errors import UserError, run_cli


def load_class(spec: str) -> type:
    """``package.module:Class`` -> the class (a dataclass)."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise UserError(f"expected MODULE:CLASS (e.g. core.config:RunConfig), got '{spec}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import module '{module_name}': {exc}") from None
    obj = module
    for part in class_name.split("."):
        if not hasattr(obj, part):
            raise UserError(f"module '{module_name}' has no attribute '{class_name}'")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise UserError(f"'{spec}' is not a config dataclass")
    return obj


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    print("\n".join(config_reference(load_class(spec)) for spec in argv), end="")
    return 0


def cli() -> NoReturn:
    """The command line (console script ``cascade-config-reference``): ``error: ...`` and exit 2 on a user error."""
    run_cli(main)


if __name__ == "__main__":
    cli()
