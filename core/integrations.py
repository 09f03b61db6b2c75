"""Optional integrations (wandb, TensorBoard, any later one): a failure never stops the run.

An integration is something the run can do without: its package may be missing, its server down,
its key absent, its disk quota reached. Every call into one goes through an :class:`Integration`:
the first failure (an exception of any class, or a start that takes longer than its bound) is ONE
warning naming the integration, what it was doing and the reason, then the integration is switched
off for the rest of the run; ``metrics.jsonl``, the previews and ``loss.png`` are written either
way. Use::

    board = Integration("tensorboard")
    writer = board.start(lambda: SummaryWriter(folder))        # None when it could not start
    board.call("log scalars", lambda: writer.add_scalar("loss", 0.1, 3))
    board.close(lambda: writer.close())
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional, TypeVar

__all__ = ["Integration", "run_bounded"]

log = logging.getLogger("core")

T = TypeVar("T")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_bounded(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()`` in a daemon thread, waited for at most ``seconds``: its result, its exception, or
    ``TimeoutError`` (the thread is left behind; it cannot be killed, only no longer waited for)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"integration: {what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class Integration:
    """One optional integration of a run; see the module docstring."""

    def __init__(self, name: str, fallback: str = "metrics.jsonl and the preview files are still written") -> None:
        self.name = name
        self.fallback = fallback
        self.enabled = True
        self.failure: Optional[str] = None  # the reason it was switched off, for tests and summaries

    def disable(self, doing: str, reason: str) -> None:
        """Switch the integration off with the one warning (later calls are no-ops)."""
        if not self.enabled:
            return
        self.enabled = False
        self.failure = f"{doing}: {reason}"
        log.warning("%s: cannot %s (%s); the run continues without %s (%s)", self.name, doing, reason, self.name,
                    self.fallback)

    def start(self, fn: Callable[[], T], timeout: Optional[float] = None, doing: str = "start") -> Optional[T]:
        """``fn()`` (bounded by ``timeout`` seconds when given), or None after the one warning."""
        return self.call(doing, fn, timeout=timeout)

    def call(self, doing: str, fn: Callable[[], T], timeout: Optional[float] = None) -> Optional[T]:
        """``fn()`` while enabled; any exception (or the timeout) switches the integration off."""
        if not self.enabled:
            return None
        try:
            return run_bounded(fn, timeout, doing) if timeout is not None else fn()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - an integration never ends the run (SystemExit included:
            # some clients call sys.exit when their service dies)
            self.disable(doing, _reason(exc))
            return None

    def close(self, fn: Callable[[], Any], timeout: Optional[float] = None) -> None:
        """The integration's own finish (upload, flush), bounded, then switched off quietly."""
        self.call("finish", fn, timeout=timeout)
        self.enabled = False
