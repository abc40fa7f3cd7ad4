"""The one thread of a process that runs the engine's torch work.

torch runs its CPU operators on OpenMP, and every thread that runs an operator in parallel gets a
team of OpenMP threads of its own, kept as long as that thread lives. With two such teams in a
process, more threads wait for work than there are cores, and each of the thousands of small
parallel regions of a generation is slower to start: measured on a 2-core CPU, a 20-step image
of the shipped model took 0.66 s on a fresh thread but 1.96 s once another live thread (the main
thread, a server's pool thread) had run a model once.
So every generation, model load and upscale runs here, on one long-lived thread: one team, always
warm.

:func:`submit` queues a call and returns its :class:`~concurrent.futures.Future`; :func:`call`
waits for it, and runs the function in place when already on this thread (nested work, e.g. a
plugin that generates, never waits for itself).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["call", "on_torch_thread", "submit"]

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread_ident: int | None = None


def _mark() -> None:
    global _thread_ident
    _thread_ident = threading.get_ident()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="latent-studio-torch", initializer=_mark
            )
        return _executor


def on_torch_thread() -> bool:
    return _thread_ident is not None and threading.get_ident() == _thread_ident


def submit(function: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """Queue ``function(*args, **kwargs)`` on the torch thread (in order: one call at a time)."""
    return _pool().submit(function, *args, **kwargs)


def call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` run on the torch thread; its result or its exception."""
    if on_torch_thread():
        return function(*args, **kwargs)
    return submit(function, *args, **kwargs).result()
