"""Every document a code comment or docstring cites is in the repository (a clone has no other
docs): ``docs/OFFICIAL.md`` holds the official facts the code relies on."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

from tests.helpers.product import ROOT, product_files

#: a path ending in .md inside comment text (URLs are skipped)
MD_PATH = re.compile(r"[\w./-]*\w\.md\b")


def comment_text(path: Path) -> str:
    """The comments and docstrings of a Python file, joined."""
    source = path.read_text(encoding="utf-8")
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
    return "\n".join(parts)


def cited_docs(text: str) -> set[str]:
    """The ``.md`` paths named in ``text``, without those inside URLs."""
    found = set()
    for word in text.split():
        if "://" in word:
            continue
        found.update(MD_PATH.findall(word))
    return found


def test_cited_docs_are_found_in_text():
    text = "# see docs/LORA.md, and training.md §3; not https://example.org/x/README.md"
    assert cited_docs(text) == {"docs/LORA.md", "training.md"}


def test_every_cited_doc_exists():
    files = product_files() + sorted((ROOT / "tests").rglob("*.py"))
    missing = []
    for path in files:
        for doc in sorted(cited_docs(comment_text(path))):
            if not ((ROOT / doc).is_file() or (path.parent / doc).is_file()):
                missing.append(f"{path.relative_to(ROOT)}: {doc}")
    assert not missing, f"comments cite documents that are not in the repository: {missing}"


def test_every_doc_cited_by_a_doc_exists():
    """The markdown docs too (a link or a path relative to the repository or to the citing doc)."""
    missing = []
    for path in sorted(ROOT.rglob("*.md")):
        if ".git" in path.parts or any(part.endswith(".egg-info") for part in path.parts):
            continue
        for doc in sorted(cited_docs(path.read_text(encoding="utf-8"))):
            if not ((ROOT / doc).is_file() or (path.parent / doc).is_file()):
                missing.append(f"{path.relative_to(ROOT)}: {doc}")
    assert not missing, f"docs cite documents that are not in the repository: {missing}"
