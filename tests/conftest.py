"""Shared fixtures of the test suite: one intra-op thread, and the offline tiny assets.

* ``one_thread`` (module): one intra-op thread for a module's tests, the previous count restored
  after the module. Modules ask for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``
  (or through a fixture that depends on it); it is not autouse because most modules run tiny
  tensors in a few milliseconds either way.
* ``train_assets`` (session): the demo assets the Stage C / Stage B training tests train on.
* ``adapter_assets`` (module, with ``one_thread``): the LoRA / ControlNet assets; the folder is
  built once per session.

Child Python processes (``python3 train/train_c.py ...``, ``torch.distributed.run``, scripts written
into a temporary folder) import THIS checkout: the repository root is put first on the PYTHONPATH
environment variable of the test process when this file loads, so it holds even where another copy
of cascade-train is installed (pytest's ``pythonpath`` setting only reaches the test process itself).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT)])


@contextmanager
def one_intraop_thread() -> Iterator[None]:
    """One intra-op thread inside the block, the previous count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy (oversubscribed) machine OpenMP spin-waiting slows tiny kernels a lot."""
    with one_intraop_thread():
        yield


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory) -> Path:
    """The demo assets at test size: tiny frozen parts (random-init, seeded), tiny CLIP, and 2 shards
    holding 2 random 64 px crops of each of 8 photographs (16 samples)."""
    from tools.make_demo_assets import make_dataset, make_models

    folder = tmp_path_factory.mktemp("train_assets", numbered=False)
    # a session fixture cannot use the module-scoped one_thread; the build wants one thread too
    with one_intraop_thread():
        make_models(folder, calibration_size=64)
        make_dataset(folder, image_size=64, n_variants=2, n_shards=2, limit=8)
    return folder


@pytest.fixture(scope="session")
def score_clip(tmp_path_factory) -> Path:
    """A tiny CLIP whose text and vision embeddings share one width (16): a CLIP-score model
    (train/preview_clip_score.py), in the text/ + vision/ layout."""
    from tools.tiny_clip import write_tiny_clip

    folder = tmp_path_factory.mktemp("score_clip", numbered=False)
    with one_intraop_thread():
        write_tiny_clip(folder, text_width=32, vision_width=32, projection_dim=16, image_size=32, patch_size=8, seed=5)
    return folder


@pytest.fixture(scope="module")
def adapter_assets(tmp_path_factory, one_thread):
    """Tiny frozen parts, a tiny 'pretrained' Stage C and a 4-photo shard (built once per session)."""
    from tests.helpers.adapter_assets import make_adapter_assets

    return make_adapter_assets(tmp_path_factory.getbasetemp())


def pytest_collection_modifyitems(config, items):
    """Slow (end-to-end, multi-process) tests first: with ``-n 2`` (pytest-xdist) the longest ones
    then start at once instead of leaving one worker busy alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept otherwise
