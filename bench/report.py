"""How a benchmark hands back its figures: one summary line on stdout and, with ``--out``, the
whole result as JSON (what bench/README.md's tables are made from)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional


def report(line: str, result: Mapping[str, Any], out: Optional[str]) -> int:
    """Print ``line`` (flushed), write ``result`` to ``out`` as indented JSON when given; exit code 0."""
    print(line, flush=True)
    if out:
        Path(out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0
