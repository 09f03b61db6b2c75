"""The product's Python files (what the house-rule tests read): every package folder and the
scripts at the repository root; not tests/."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: top-level folders of product code
PACKAGES = ("core", "fileio", "gdf", "modules", "train", "inference", "tools", "bench")


def product_files() -> list[Path]:
    """Every Python file of the product: the packages above and the scripts at the root (demo.py)."""
    files = [p for d in PACKAGES for p in sorted((ROOT / d).rglob("*.py"))]
    return files + sorted(ROOT.glob("*.py"))


def module_name(path: Path) -> str:
    """``core/data/worker.py`` -> ``core.data.worker``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The product modules ``path`` imports, at the top or inside a function (a lazy import is an
    import too): for ``from a.b import c`` that is ``a.b.c`` when it is a module, else ``a.b``."""
    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(r for a in node.names if (r := resolve(a.name)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up (level - 1) packages from this file's package
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                r = full if full in known else resolve(base)
                if r:
                    found.add(r)
    found.discard(own)
    return found
