"""Faults, round three (issue 28, defects 1 and 3): an optional integration never ends the run, and
the run's logs always match the weights it continues from.

wandb runs for real against real servers on 127.0.0.1: a closed port (connection refused), a
server that accepts and never answers, and one that answers but does not know the API key.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from core.integrations import Integration
from core.logging import RunLogger, read_metrics
from tools.loopback import StatusServer, free_port


@dataclass
class Cfg:
    experiment_id: str = "faults3"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb's own settings pointed at nothing real: no key, no netrc, quiet."""
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return monkeypatch


@pytest.fixture
def hanging_server():
    """Accepts connections, never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def answering_server():
    """Answers every request with 401 (it does not know the key)."""
    with StatusServer(401) as server:
        yield server.url


def _wandb_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "wandb" in r.getMessage()]


def _use(logger: RunLogger) -> None:
    logger.log(1, {"loss": 1.0})
    logger.log_images(1, "x", torch.rand(1, 3, 4, 4))
    logger.log(2, {"loss": 0.5})
    logger.close()


@pytest.mark.parametrize("server", ["refused", "hanging"])
def test_unreachable_wandb_base_url_logs_offline_with_one_warning(tmp_path, wandb_env, caplog, server, request):
    """Defect 1: the reachability check ignored WANDB_BASE_URL; a server that does not answer
    (refused, or accepting and silent) is now one warning and an offline wandb run."""
    url = (f"http://127.0.0.1:{free_port()}" if server == "refused" else request.getfixturevalue("hanging_server"))
    wandb_env.setenv("WANDB_BASE_URL", url)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(str(tmp_path / "run"), Cfg(), is_main=True, total_steps=2, wandb_project="faults3")
        assert time.monotonic() - started < 60
        assert logger.wandb is not None  # offline run
        _use(logger)
    warnings = _wandb_warnings(caplog)
    assert len(warnings) == 1 and url in warnings[0] and "offline" in warnings[0], warnings
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert [r["step"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))] == [1, 2]


def test_no_api_key_is_one_warning_and_the_run_logs_on(tmp_path, wandb_env, caplog, answering_server):
    """Defect 1: an answering server and no API key made wandb.init raise (a traceback ending the
    run); now one warning names wandb and the reason."""
    wandb_env.setenv("WANDB_BASE_URL", answering_server)
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(str(tmp_path / "run"), Cfg(), is_main=True, total_steps=2, wandb_project="faults3")
        _use(logger)
    warnings = _wandb_warnings(caplog)
    assert len(warnings) == 1 and "wandb: cannot start" in warnings[0] and "API key" in warnings[0], warnings
    assert logger.wandb is None
    assert [r["step"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))] == [1, 2]


def test_wandb_mode_is_honoured_and_a_failing_log_call_is_one_warning(tmp_path, wandb_env, caplog):
    """WANDB_MODE=offline: no reachability check (no warning); a log call that raises (the run was
    finished underneath) switches wandb off with one warning, metrics.jsonl goes on."""
    wandb_env.setenv("WANDB_MODE", "offline")
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(str(tmp_path / "run"), Cfg(), is_main=True, total_steps=3, wandb_project="faults3")
        assert not _wandb_warnings(caplog)
        logger.log(1, {"loss": 1.0})
        logger.wandb.finish()  # a real failure of the next wandb.log: "run is finished"
        logger.log(2, {"loss": 0.5})
        logger.log(3, {"loss": 0.25})
        logger.close()
    warnings = _wandb_warnings(caplog)
    assert len(warnings) == 1 and "wandb: cannot log metrics" in warnings[0], warnings
    assert [r["step"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))] == [1, 2, 3]


def test_integration_guard_bounds_time_and_warns_once(caplog):
    """The shared mechanism (for TensorBoard and later integrations too): an exception or a start
    beyond its bound is one warning, later calls are no-ops."""
    board = Integration("tensorboard")
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        assert board.start(lambda: time.sleep(5), timeout=0.2) is None
        assert time.monotonic() - started < 2
        assert board.call("log scalars", lambda: 1 / 0) is None  # already off: not even called
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("tensorboard: cannot start (TimeoutError")
    other = Integration("other")
    assert other.call("log", lambda: 7) == 7
    with caplog.at_level(logging.WARNING):
        other.call("log", lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert "other: cannot log (OSError: [Errno 28] No space left on device)" in caplog.records[-1].getMessage()


# ------------------------------------------------------------------- defect 3: logs match the weights
def test_a_start_without_checkpoint_truncates_the_previous_metrics(train_assets, tmp_path):
    """Defect 3: a run killed before its first checkpoint and started again appended to the old
    metrics.jsonl (steps 1, 2, 1, 2, 3, ...). Every start now keeps only the records up to the
    restored update (none without a checkpoint)."""
    from tests.test_faults_state import run_args, train_c

    run = tmp_path / "ck" / "trunc"
    run.mkdir(parents=True)
    stale = "".join(f'{{"step": {s}, "time": 0, "loss": 9.0}}\n' for s in (1, 2, 3))
    (run / "metrics.jsonl").write_text(stale)  # what the killed run left behind, no checkpoint
    assert train_c(run_args(train_assets, tmp_path, experiment_id="trunc", updates=2, save_every=2)) == 0
    records = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] != 9.0 for r in records)
