"""The engine the front ends use with ``--ray``: generations on the deployment's replicas,
everything else (model listings, fields, limits, samplers) from a local engine that never loads a
model.

:meth:`RayEngine.stream` is what :func:`webui.engine.stream.stream` hands a request to when the
engine has one: it sends the request with its model as the multiplexed model id, yields the
replica's progress events, calls ``on_batch`` with each finished batch (so images are saved here,
by the web app, with the same names and infotext as in one process), and returns the result.
Interrupt cancels the streamed response (the replica stops within a step); Skip is sent through
the process's :class:`~webui.serve.replica.JobSignals` actor to the replica running the job.

Faults: a replica that dies before any batch of the request came back costs a retry, once, on
another replica (nothing was saved yet, so nothing is saved twice); after that, or once a batch
was saved, the request fails with a one-line :class:`~webui.errors.ReplicaLost` and what was
saved stays. An error raised on the replica (an unknown model, a bad request) is raised here as
the same exception, as in one process; Ray's full queue is :class:`~webui.errors.QueueFull`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

from webui.engine.control import GenerationControl
from webui.errors import QueueFull, ReplicaLost
from webui.request import GenerationRequest
from webui.serve.replica import BatchDone, Finished, Started, model_id, signals_actor


class RayEngine:
    """An engine whose ``generate`` runs on Ray Serve replicas (see the module text)."""

    def __init__(self, local: Any, handle: Any, *, concurrency: int = 1) -> None:
        self.local = local
        self.handle = handle
        self.concurrency = concurrency  # generations at once: the replicas (the web app runs as many)
        self.last_replica: str | None = None  # the replica of the latest request (tests, logs)
        self.last_actor: str | None = None  # and its Ray actor's name
        self._signals: Any = None

    def __getattr__(self, name: str) -> Any:  # models, fields, limits, schedulers, plugins...
        return getattr(self.local, name)

    def signals(self) -> Any:
        if self._signals is None:
            self._signals = signals_actor()
        return self._signals

    def stream(
        self,
        request: GenerationRequest,
        *,
        control: GenerationControl | None = None,
        preview_every: int = 5,
        on_batch: Callable[[list[Any]], None] | None = None,
    ) -> Iterator[Any]:
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        control = control or GenerationControl()
        job = secrets.token_hex(8)
        signals = self.signals()
        done: list[Any] = []  # the images of the batches that came back (and were saved)
        attempts = 0
        try:
            while True:
                attempts += 1
                attempt = self._attempt(request, job, signals, control, done, on_batch)
                try:
                    yield from attempt
                    return
                except BackPressureError:
                    raise QueueFull(
                        "The server is busy: the replicas' queue is full, try again in a moment."
                    ) from None
                except RequestCancelledError:
                    break  # interrupted before the replica sent anything
                except RayTaskError as error:  # raised on the replica: raise it as one process would
                    cause = getattr(error, "cause", None)
                    if isinstance(cause, Exception) and not isinstance(cause, RayActorError):
                        raise cause from None
                    raise
                except RayActorError as error:  # the replica died (its process or its node)
                    if done or attempts > 1 or control.interrupted:
                        saved = f" ({len(done)} image(s) saved before it stopped)" if done else ""
                        raise ReplicaLost(
                            f"the replica running this generation stopped{saved}: "
                            f"{type(error).__name__}; try again"
                        ) from None
                    # nothing came back yet: once more, on another replica (Serve replaces the lost one)
        finally:
            signals.forget.remote(job)
        from webui.engine.pipeline import GenerationResult  # interrupted: what was finished is kept

        yield GenerationResult(images=done, interrupted=True)

    def _attempt(
        self,
        request: GenerationRequest,
        job: str,
        signals: Any,
        control: GenerationControl,
        done: list[Any],
        on_batch: Callable[[list[Any]], None] | None,
    ) -> Iterator[Any]:
        """One try on a replica: its events; a :class:`GenerationResult` at the end (also when
        interrupted, with the batches finished by then)."""
        options = self.handle.options(stream=True, multiplexed_model_id=model_id(request))
        response = options.generate.remote(request, job, signals)
        finished = False
        try:
            for event in response:
                if control.skipped and not control.interrupted:  # to the replica running the job
                    signals.skip.remote(job)
                    control.clear_skip()
                if isinstance(event, Started):
                    self.last_replica, self.last_actor = event.replica, event.actor
                elif isinstance(event, BatchDone):
                    done.extend(event.images)
                    if on_batch is not None:
                        on_batch(event.images)
                elif isinstance(event, Finished):
                    finished = True
                    if event.batches_sent:
                        # the very objects on_batch was given (callers match them up, as in one process)
                        event.result.images = list(done)
                    yield event.result
                else:
                    yield event
                if control.interrupted and not finished:
                    break
        finally:
            if not finished:
                response.cancel()  # the replica stops within a step
        if not finished:  # interrupted (a dead replica raised above)
            from webui.engine.pipeline import GenerationResult

            yield GenerationResult(images=done, interrupted=True)

    def generate(
        self,
        request: GenerationRequest,
        *,
        callback: Any = None,
        control: GenerationControl | None = None,
        on_batch: Callable[[list[Any]], None] | None = None,
        bundle: Any = None,
    ) -> Any:
        """The result of ``request`` run on a replica (``callback`` gets no step objects here:
        follow a run with :meth:`stream`)."""
        if bundle is not None:
            raise ValueError("a bundle built in code cannot be sent to a Ray replica")
        result = None
        for event in self.stream(request, control=control, on_batch=on_batch, preview_every=0):
            if not hasattr(event, "step"):
                result = event
        return result
