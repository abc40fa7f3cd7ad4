"""Waiting for something to happen in a test, with a deadline instead of a fixed sleep.

A fixed ``time.sleep`` is too short on a loaded machine and wastes time on an idle one; these return
as soon as the condition holds and fail with a message naming what never happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``condition`` until it returns a true value, and return that value.

    Checked once more at the deadline, so a condition that became true meanwhile is not missed.
    Raises ``AssertionError("... did not happen within N s")`` when it never does."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)
