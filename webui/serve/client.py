"""The engine the front ends use with ``--ray``: generations on the deployment's replicas,
everything else (model listings, fields, limits, samplers) from a local engine that never loads a
model.

:meth:`RayEngine.stream` is what :func:`webui.engine.stream.stream` hands a request to when the
engine has one: it sends the request with its model as the multiplexed model id, yields the
replica's progress events, calls ``on_batch`` with each finished batch (so images are saved here,
by the web app, with the same names and infotext as in one process), and returns the result.
Interrupt cancels the streamed response; the replica stops within a step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from webui.engine.control import GenerationControl
from webui.request import GenerationRequest
from webui.serve.replica import BatchDone, Finished, model_id


class RayEngine:
    """An engine whose ``generate`` runs on Ray Serve replicas (see the module text)."""

    def __init__(self, local: Any, handle: Any, *, concurrency: int = 1) -> None:
        self.local = local
        self.handle = handle
        self.concurrency = concurrency  # generations at once: the replicas (the web app runs as many)
        self.last_replica: str | None = None

    def __getattr__(self, name: str) -> Any:  # models, fields, limits, schedulers, plugins...
        return getattr(self.local, name)

    def stream(
        self,
        request: GenerationRequest,
        *,
        control: GenerationControl | None = None,
        preview_every: int = 5,
        on_batch: Callable[[list[Any]], None] | None = None,
    ) -> Iterator[Any]:
        control = control or GenerationControl()
        response = self.handle.options(stream=True, multiplexed_model_id=model_id(request)).generate.remote(
            request
        )
        finished = False
        done: list[Any] = []  # the images of the batches that came back
        try:
            for event in response:
                if isinstance(event, BatchDone):
                    done.extend(event.images)
                    if on_batch is not None:
                        on_batch(event.images)
                elif isinstance(event, Finished):
                    self.last_replica = event.replica
                    finished = True
                    if len(event.result.images) == len(done):
                        # the very objects on_batch was given (callers match them up, as in one process)
                        event.result.images = done
                    yield event.result
                else:
                    yield event
                if control.interrupted and not finished:
                    break
        finally:
            if not finished:
                response.cancel()  # the replica stops within a step
        if not finished and control.interrupted:  # as in one process: what was finished is kept
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
