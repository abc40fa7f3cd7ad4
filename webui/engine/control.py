"""Stopping a running generation: the switches a front-end flips and the signal the engine raises.

Plain Python, no torch: the web UI holds a :class:`GenerationControl` per browser session and the
engine checks it between steps, so the UI can import this without loading the engine's libraries.
"""

from __future__ import annotations

import threading

__all__ = ["GenerationControl", "GenerationStopped"]


class GenerationStopped(Exception):  # noqa: N818 - a signal, not an error
    """Raised inside a batch (e.g. between the text encoder's chunks) when the request was
    interrupted or the batch skipped; the engine catches it and keeps what is finished."""


class GenerationControl:
    """Per-request interrupt and skip switches, safe to flip from another thread.

    ``interrupt()`` stops the whole request after the current step and keeps what is finished;
    ``skip()`` stops the current batch only and moves on to the next one.
    """

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def skipped(self) -> bool:
        return self._skip.is_set()

    def clear_skip(self) -> None:
        self._skip.clear()

    @property
    def stopped(self) -> bool:
        """Interrupted, or the current batch skipped."""
        return self._interrupt.is_set() or self._skip.is_set()

    def check(self) -> None:
        """Raise :class:`GenerationStopped` if the request was interrupted or the batch skipped:
        for long work between sampler steps (text encoding) to stop within one step."""
        if self.stopped:
            raise GenerationStopped()
