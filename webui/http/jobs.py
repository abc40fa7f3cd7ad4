"""Jobs: generations queued in front of the one device, each with an id, an owner and a state that
can be followed.

:class:`JobManager` keeps a first-in first-out queue served by worker threads, one per generation
the engine runs at once (one; with Ray Serve, one per replica). A job is
``queued`` (with its place in the queue) until the worker holds the device's turn, then
``running`` (step, total, ETA, the latest preview), and ends ``done``, ``failed`` (with its
one-line message) or ``cancelled``. The device's turn is shared with the web app's Generate
buttons, and so is the bound on waiting generations: when the jobs waiting here plus the web
app's waiting clicks reach it, :meth:`JobManager.submit` raises :class:`QueueFull`.

A job belongs to its owner: every lookup takes the owner, and another owner's job is "not found".
Finished jobs are kept for ``keep_seconds`` and at most ``keep_count`` of them (the oldest go first).

Nothing here knows HTTP or gradio: the manager runs whatever ``run(job)`` yields (progress events
with ``step``/``total``/``eta``/``preview``, then one result), so it is tested on its own.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from webui.errors import LatentStudioError, QueueFull

__all__ = ["FINAL_STATES", "Job", "JobManager", "QueueFull"]

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL_STATES = frozenset({DONE, FAILED, CANCELLED})


@dataclass
class Job:
    """One generation asked for over HTTP. ``result`` is what ``run`` returned last (the web
    service's ``Finished``); ``error`` the one-line message of a failure and ``error_kind`` the
    exception's class name (the routes map it to a status)."""

    id: str
    owner: str
    task: str
    request: Any
    options: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    started: float | None = None
    ended: float | None = None
    step: int = 0
    total: int = 0
    batch: int = 0
    batches: int = 0
    done_steps: int = 0
    overall: int = 0
    eta: float | None = None
    preview: Any = None
    result: Any = None
    error: str | None = None
    error_kind: str | None = None
    interrupted: bool = False
    version: int = 0  # bumped on every change, so followers can wait for the next one

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def fraction(self) -> float:
        if self.state == DONE:
            return 1.0
        return self.done_steps / self.overall if self.overall else 0.0


class JobManager:
    """The queue of jobs in front of the device, served by ``workers`` threads (one per
    generation the engine runs at once: 1, or the Ray Serve replicas).

    ``run(job)`` yields the job's progress events and finally its result, on a worker thread;
    ``stop(job)`` interrupts a running job (``skip(job)`` drops its current batch); ``turn()`` is
    the device's turn, held while a job runs (shared with the web app, so one generation runs at
    a time whoever asked). ``max_waiting`` bounds the jobs waiting plus ``others_waiting()`` (the
    web app's waiting clicks); ``busy_message`` is :class:`QueueFull`'s text (``{size}`` is filled).
    """

    def __init__(
        self,
        run: Callable[[Job], Iterator[Any]],
        *,
        stop: Callable[[Job], Any],
        skip: Callable[[Job], Any] | None = None,
        max_waiting: int = 16,
        others_waiting: Callable[[], int] = lambda: 0,
        turn: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        busy_message: str = "The server is busy: {size} generations are already waiting.",
        keep_seconds: float = 3600.0,
        keep_count: int = 100,
        clock: Callable[[], float] = time.time,
        workers: int = 1,
    ) -> None:
        self._run = run
        self._stop = stop
        self._skip = skip
        self.max_waiting = max_waiting
        self.others_waiting = others_waiting
        self._turn = turn
        self.busy_message = busy_message
        self.keep_seconds = keep_seconds
        self.keep_count = keep_count
        self.clock = clock
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []  # oldest first
        self._changed = threading.Condition()
        self._closed = False
        self._counter = itertools.count(1)
        self._workers = [
            threading.Thread(target=self._work, name=f"latent-studio-jobs-{n}", daemon=True)
            for n in range(max(1, workers))
        ]
        for worker in self._workers:
            worker.start()

    # -- asking ------------------------------------------------------------------------------

    def submit(self, owner: str, task: str, request: Any, options: dict[str, Any] | None = None) -> Job:
        """Queue ``request`` for ``owner`` and return its job at once; raises :class:`QueueFull`
        when the bound is reached (nothing is queued then)."""
        with self._changed:
            if self._closed:
                raise QueueFull("the server is shutting down", retry_after=30)
            if len(self._queue) + self.others_waiting() >= self.max_waiting:
                raise QueueFull(
                    self.busy_message.format(size=self.max_waiting), retry_after=self._retry_after()
                )
            job = Job(
                id=f"{next(self._counter)}-{secrets.token_hex(8)}",
                owner=owner,
                task=task,
                request=request,
                options=dict(options or {}),
                created=self.clock(),
            )
            self._jobs[job.id] = job
            self._queue.append(job)
            self._forget_old()
            self._changed.notify_all()
            return job

    def get(self, job_id: str, owner: str) -> Job | None:
        """``owner``'s job ``job_id``; None when there is none or it belongs to someone else."""
        with self._changed:
            job = self._jobs.get(job_id)
            return job if job is not None and job.owner == owner else None

    def jobs(self, owner: str) -> list[Job]:
        """``owner``'s jobs, oldest first."""
        with self._changed:
            return [job for job in self._jobs.values() if job.owner == owner]

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 for the one after...; None when ``job`` is not queued."""
        with self._changed:
            for place, queued in enumerate(self._queue, 1):
                if queued is job:
                    return place
        return None

    def waiting(self) -> int:
        with self._changed:
            return len(self._queue)

    def running(self) -> Job | None:
        """The job that has run longest (None when none runs)."""
        with self._changed:
            return self._running[0] if self._running else None

    def _running_of(self, owner: str) -> Job | None:
        """``owner``'s running job that started last."""
        with self._changed:
            return next((job for job in reversed(self._running) if job.owner == owner), None)

    def cancel(self, job_id: str, owner: str) -> Job | None:
        """Cancel ``owner``'s job: a queued one leaves the queue at once, a running one is
        interrupted after its current step (its finished images are kept, its state becomes
        ``cancelled``). A finished job is left as it is. None when there is no such job."""
        with self._changed:
            job = self.get(job_id, owner)
            if job is None or job.finished:
                return job
            if job.state == QUEUED and job in self._queue:
                self._queue.remove(job)
                self._end(job, CANCELLED)
                return job
            job.interrupted = True
            self._touch(job)
        self._stop(job)
        return job

    def interrupt(self, owner: str) -> Job | None:
        """Interrupt ``owner``'s running job, if one of the running jobs is theirs (A1111's ``/interrupt``)."""
        job = self._running_of(owner)
        if job is None:
            return None
        return self.cancel(job.id, owner)

    def skip(self, owner: str) -> Job | None:
        """Skip the current batch of ``owner``'s running job (A1111's ``/skip``)."""
        job = self._running_of(owner)
        if job is None or self._skip is None:
            return None
        self._skip(job)
        return job

    def wait(self, job: Job, version: int, timeout: float) -> int:
        """Wait until ``job`` changes after ``version`` (or ``timeout`` seconds pass, or it is
        finished); returns its version."""
        with self._changed:
            self._changed.wait_for(
                lambda: job.version != version or job.finished or self._closed, timeout=timeout
            )
            return job.version

    def wait_finished(self, job: Job, timeout: float | None = None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: job.finished or self._closed, timeout=timeout)

    def close(self) -> None:
        """Stop the worker: queued jobs are cancelled, the running one is interrupted."""
        with self._changed:
            self._closed = True
            for job in list(self._queue):
                self._end(job, CANCELLED)
            self._queue.clear()
            running = list(self._running)
            self._changed.notify_all()
        for job in running:
            self._stop(job)
        for worker in self._workers:
            worker.join(timeout=30)

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                job = self._queue[0]
            with self._turn():
                with self._changed:
                    if not self._queue or self._queue[0] is not job:  # cancelled while waiting for the turn
                        continue
                    self._queue.popleft()
                    if self._closed:
                        self._end(job, CANCELLED)
                        return
                    job.state, job.started = RUNNING, self.clock()
                    self._running.append(job)
                    self._touch(job)
                try:
                    self._follow(job)
                finally:
                    with self._changed:
                        self._running.remove(job)

    def _follow(self, job: Job) -> None:
        try:
            for event in self._run(job):
                with self._changed:
                    if hasattr(event, "step") and hasattr(event, "total"):
                        job.step, job.total = event.step, event.total
                        job.batch, job.batches = getattr(event, "batch", 1), getattr(event, "batches", 1)
                        job.done_steps, job.overall = (
                            getattr(event, "done", event.step),
                            getattr(event, "overall", event.total),
                        )
                        job.eta = getattr(event, "eta", None)
                        preview = getattr(event, "preview", None)
                        if preview:
                            job.preview = preview[0] if isinstance(preview, list) else preview
                    else:
                        job.result = event
                    self._touch(job)
        except Exception as error:
            with self._changed:
                job.error = (
                    str(error)
                    if isinstance(error, LatentStudioError)
                    else f"generation failed: {type(error).__name__}: {error}"
                )
                job.error = job.error.splitlines()[0] if job.error else type(error).__name__
                job.error_kind = type(error).__name__
                if not isinstance(error, LatentStudioError):
                    log.error("job %s failed", job.id, exc_info=error)
                self._end(job, FAILED)
            return
        with self._changed:
            self._end(job, CANCELLED if job.interrupted else DONE)

    # -- bookkeeping (under the lock) --------------------------------------------------------

    def _touch(self, job: Job) -> None:
        job.version += 1
        self._changed.notify_all()

    def _end(self, job: Job, state: str) -> None:
        job.state, job.ended = state, self.clock()
        job.preview = None
        self._touch(job)
        self._forget_old()

    def _forget_old(self) -> None:
        """Drop finished jobs older than ``keep_seconds``, and the oldest beyond ``keep_count``."""
        now = self.clock()
        finished = [job for job in self._jobs.values() if job.finished]
        for job in finished:
            if job.ended is not None and now - job.ended > self.keep_seconds:
                del self._jobs[job.id]
        finished = [job for job in self._jobs.values() if job.finished]
        for job in finished[: max(0, len(finished) - self.keep_count)]:
            del self._jobs[job.id]

    def _retry_after(self) -> int:
        """A hint for ``Retry-After``: the running job's ETA, at least 5 and at most 120 seconds."""
        etas = [job.eta for job in self._running if job.eta is not None]
        eta = min(etas) if etas else 10.0
        return int(min(120, max(5, eta)))
