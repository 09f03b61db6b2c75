"""Shared fixtures of the test suite: one intra-op thread, and the offline tiny assets."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy (oversubscribed) machine OpenMP spin-waiting slows tiny kernels a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter_assets(tmp_path_factory, one_thread):
    """Tiny frozen parts, a tiny 'pretrained' Stage C and a 4-photo shard (built once per session)."""
    from tests.helpers.adapter_assets import make_adapter_assets

    return make_adapter_assets(tmp_path_factory.getbasetemp())
