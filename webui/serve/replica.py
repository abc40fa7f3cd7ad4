"""The Ray Serve deployment: one :class:`~webui.engine.pipeline.Engine` per replica.

A request goes to ``generate`` with its model name as the multiplexed model id, so Ray Serve sends
it to a replica that already has that model loaded when there is one; a replica keeps at most
``cache_size`` models (Ray Serve unloads the least recently used one, and the engine's own cache is
sized the same). ``generate`` streams what :func:`webui.engine.stream.stream` yields — progress with
previews, each finished batch's images, then the result — so the caller sees the same events as in
one process. Cancelling the streamed response interrupts the generation within a step.

Ray is imported by :func:`deployment` only.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from webui.request import GenerationRequest


@dataclass
class ReplicaSettings:
    """What every replica is built with (sent to the replicas, so plain values only)."""

    models_dir: str | None = None
    extra_models_dirs: list[str] = field(default_factory=list)
    default_model: str | None = None
    cache_size: int = 2
    threads: int = 1  # torch CPU threads per replica
    allow_pickle: bool = False
    preview_every: int = 5


@dataclass
class BatchDone:
    """A finished batch's images, streamed before the next batch starts (the caller saves them)."""

    images: list[Any]


@dataclass
class Finished:
    """The last event of a stream: the result, and which replica made it."""

    result: Any
    replica: str


class EngineReplica:
    """The deployment's class (see :func:`deployment`): an engine, loaded models multiplexed."""

    def __init__(self, settings: ReplicaSettings) -> None:
        import torch

        from webui.engine.pipeline import Engine

        torch.set_num_threads(max(1, settings.threads))
        self.settings = settings
        self.engine = Engine(
            models_dir=settings.models_dir,
            extra_models_dirs=settings.extra_models_dirs,
            default_model=settings.default_model,
            cache_size=settings.cache_size,  # as many as the multiplexing keeps
            allow_pickle=settings.allow_pickle,
            allow_paths=False,
        )
        self.replica = _replica_id()

    async def load(self, model: str) -> Any:
        """The model's bundle, loaded on a worker thread (the event loop keeps streaming)."""
        return await asyncio.to_thread(self.engine.models.get, None if model == DEFAULT_MODEL_ID else model)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Any]:
        from webui.engine.stream import stream

        await self.load_model(model_id(request))  # multiplexed: this replica now has the model
        events: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def on_batch(images: list[Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, BatchDone(images))

        def work() -> None:
            try:
                iterator = stream(
                    self.engine, request, preview_every=self.settings.preview_every, on_batch=on_batch
                )
                try:
                    for item in iterator:
                        if stop.is_set():
                            break  # closing the iterator interrupts the engine within a step
                        loop.call_soon_threadsafe(events.put_nowait, item)
                finally:
                    iterator.close()
            except BaseException as error:
                loop.call_soon_threadsafe(events.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, _END)

        worker = asyncio.create_task(asyncio.to_thread(work))
        try:
            while True:
                item = await events.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if hasattr(item, "images") and hasattr(item, "interrupted"):  # the GenerationResult
                    yield Finished(item, self.replica)
                else:
                    yield item
        finally:  # also when the caller cancelled the response
            stop.set()
            await worker

    async def replica_id(self) -> str:
        return self.replica


_END = object()
DEFAULT_MODEL_ID = "(default)"  # the multiplexed model id of requests that name no model


def model_id(request: GenerationRequest) -> str:
    """The multiplexed model id a request is routed by."""
    return request.model or DEFAULT_MODEL_ID


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"


def deployment(
    settings: ReplicaSettings,
    *,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    num_gpus: float = 0,
    num_cpus: float = 1,
) -> Any:
    """The bound Ray Serve application of :class:`EngineReplica` with these settings."""
    from ray import serve

    class Replica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=settings.cache_size)
        async def load_model(self, model: str) -> Any:
            return await self.load(model)

    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": 1,
        }
    else:
        options["num_replicas"] = replicas
    options["max_ongoing_requests"] = (
        1  # one generation at a time per replica (its device); more wait in Ray's queue
    )
    return serve.deployment(Replica, name="latent-studio-engine", **options).bind(settings)
