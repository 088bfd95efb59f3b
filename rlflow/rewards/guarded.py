"""Run one reward call with a time limit, turning failures into a configured score.

A user's scorer can hang (a regex on a pathological answer, a sandbox that never returns) or
raise on odd input. One bad sample must not stall or fail a training step, so each call is
bounded by SIGALRM where that is available (the main thread of a Unix process, as in a Ray
actor) and otherwise by a daemon thread whose result is abandoned after the deadline.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

from rlflow.errors import RewardError


class ScoreTimeout(Exception):
    pass


def _alarm_available() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _on_alarm(_signum, _frame) -> None:
    raise ScoreTimeout("reward function exceeded its time limit")


_alarm_installed = False


@contextmanager
def alarm_handler() -> Iterator[None]:
    """Keep the SIGALRM handler installed for a batch of calls: installing it per call costs
    more than scoring a sample with a rule. Calls inside only arm and disarm the timer."""
    global _alarm_installed
    if not _alarm_available() or _alarm_installed:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    _alarm_installed = True
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _alarm_installed = False


def call_with_timeout(fn: Callable[..., Any], kwargs: dict, timeout_s: Optional[float]) -> Any:
    if not timeout_s or timeout_s <= 0:
        return fn(**kwargs)
    if _alarm_available():
        with alarm_handler():
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                return fn(**kwargs)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ScoreTimeout(f"reward function exceeded {timeout_s}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def guarded_score(fn: Callable[..., Any], kwargs: dict, timeout_s: Optional[float], error_score: float) -> tuple[Any, Optional[str]]:
    """``(result, None)`` on success, ``(error_score, "timeout" | "error")`` on failure."""
    try:
        return call_with_timeout(fn, kwargs, timeout_s), None
    except ScoreTimeout:
        return error_score, "timeout"
    except RewardError:  # a broken contract is the user's to fix, not a sample to score low
        raise
    except Exception:  # noqa: BLE001 - any scorer failure is scored, counted and logged
        return error_score, "error"
