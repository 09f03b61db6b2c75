"""Inference and the LoRA file code stand apart from the training core.

Each check imports in a fresh interpreter, so modules imported by other tests cannot hide an import.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from tests.helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]

# core.errors (UserError, run_cli) and core.cpu_threads (CPU threading) are the core modules inference may use.
ALLOWED_CORE_FOR_INFERENCE = {"core", "core.errors", "core.cpu_threads"}


def _modules_after_import(*names: str) -> set[str]:
    code = ("import json, sys\n" + "".join(f"import {n}\n" for n in names)
            + "print(json.dumps(sorted(sys.modules)))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _under(loaded: set[str], *packages: str) -> set[str]:
    return {m for m in loaded if m.split(".")[0] in packages}


def test_inference_imports_no_training_core():
    loaded = _modules_after_import("inference.pipeline", "inference.lora", "inference.tokens", "inference.sample")
    assert "core.training" not in loaded
    assert not {"core.lora_io", "core.lora_tokens"} & loaded  # LoRA file code is not in core
    assert _under(loaded, "core") <= ALLOWED_CORE_FOR_INFERENCE, _under(loaded, "core")
    assert not _under(loaded, "train")
    assert {"modules.lora_formats", "modules.lora_tokens"} <= loaded  # read with the trainer's own code


def test_lora_formats_and_tokens_import_nothing_outside_modules():
    loaded = _modules_after_import("modules.lora_formats", "modules.lora_tokens")
    assert not _under(loaded, "core", "train", "inference"), _under(loaded, "core", "train", "inference")
