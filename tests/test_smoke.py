"""The project's packages import (kept tiny; real tests live beside it)."""
import importlib


def test_packages_import():
    for name in ("gdf", "modules", "core", "core.data", "inference"):
        importlib.import_module(name)
