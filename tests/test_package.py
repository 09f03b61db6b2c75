"""The installable package: pyproject.toml's console scripts name real functions, its packages cover
every product package, and no product file edits ``sys.path`` (the install makes them importable)."""
from __future__ import annotations

import importlib
import inspect
import tomllib

import pytest

from tests.helpers.product import PACKAGES, ROOT, product_files

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(PYPROJECT["project"]["scripts"]))
def test_console_script_names_a_function_without_required_arguments(name):
    module, _, attr = PYPROJECT["project"]["scripts"][name].partition(":")
    func = getattr(importlib.import_module(module), attr)
    required = [p for p in inspect.signature(func).parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not required, f"{name}: the console script calls {module}:{attr}() without arguments"


def test_every_package_folder_is_installed_and_has_an_init():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for top in PACKAGES:
        for init in [ROOT / top / "__init__.py", *(p / "__init__.py" for p in (ROOT / top).rglob("*")
                                                 if p.is_dir() and any(p.glob("*.py")))]:
            assert init.is_file(), f"{init.parent.relative_to(ROOT)} holds modules but no __init__.py"
        assert top in include and f"{top}.*" in include, f"pyproject.toml does not install {top}"


def test_no_product_file_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for p in product_files() if "sys.path" in p.read_text(encoding="utf-8")]
    assert not offenders, f"product files touching sys.path (install the package instead): {offenders}"


def test_requirements_files_install_this_package():
    """The pins live in pyproject.toml only; the requirements files install the project with them."""
    def lines(name: str) -> list[str]:
        text = (ROOT / name).read_text(encoding="utf-8")
        return [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]

    assert lines("requirements.txt") == ["-e ."]
    assert lines("requirements-dev.txt") == ["-e .[dev]"]
