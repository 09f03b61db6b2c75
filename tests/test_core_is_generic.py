"""core/ is generic infrastructure: no identifier or string literal in it names a stage, a network
or an adapter (docstrings and comments may explain what the jobs do with it)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"stage_?[abc](?![a-z])|effnet|efficientnet|previewer|lora|controlnet|cnet|comfy|retoken|"
                       r"clip_(text|img|image|vision)|(?<![a-z_])clip(?![a-z_])|tokeniz", re.IGNORECASE)


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
        if isinstance(node, ast.ClassDef):  # attribute docs: a string right after an assignment
            for a, b in zip(node.body, node.body[1:]):
                if isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(a, (ast.Assign, ast.AnnAssign)):
                    out.add(id(b.value))
    return out


def _names_and_strings(tree: ast.AST):
    docs = _docstring_nodes(tree) | _doc_call_texts(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.arg):
            yield node.lineno, node.arg
        elif isinstance(node, ast.alias):
            yield getattr(node, "lineno", 0), node.name
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.value.lineno, node.arg
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def _doc_call_texts(tree: ast.AST) -> set[int]:
    """Config field documentation (``doc(default, "text")``) is documentation too."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("doc", "_doc"):
            for arg in node.args[1:]:
                for sub in ast.walk(arg):
                    out.add(id(sub))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
            for kw in node.keywords:
                if kw.arg == "metadata":
                    for sub in ast.walk(kw.value):
                        out.add(id(sub))
    return out


def test_core_names_no_stage_network_or_adapter():
    hits = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node_line, text in _names_and_strings(tree):
            if FORBIDDEN.search(text):
                hits.append(f"{path.relative_to(ROOT)}:{node_line}: {text!r}")
    assert not hits, "core/ names stages/networks/adapters:\n" + "\n".join(hits)


def _private_self_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "trainer"):
            names.add(node.attr)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_") \
                and not node.name.startswith("__"):
            names.add(node.name)
    return names


def test_jobs_use_only_public_names_of_the_core():
    core_private = _private_self_names(ROOT / "core" / "training.py")
    offenders = {}
    for path in sorted((ROOT / "train").glob("*.py")):
        used = _private_self_names(path) & core_private
        if used:
            offenders[path.name] = sorted(used)
    assert not offenders, f"jobs reach into TrainingCore's private state: {offenders}"


def test_training_core_is_short():
    lines = (ROOT / "core" / "training.py").read_text().count("\n")
    assert lines <= 450, f"core/training.py has {lines} lines; the loop and its contract should stay short"
