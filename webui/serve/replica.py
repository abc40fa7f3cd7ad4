"""The Ray Serve deployment: one :class:`~webui.engine.pipeline.Engine` per replica.

A request goes to ``generate`` with its model name as the multiplexed model id, so Ray Serve sends
it to a replica that already has that model loaded when there is one; a replica keeps at most
``cache_size`` models (Ray Serve unloads the least recently used one, and the engine's own cache is
sized the same). ``generate`` streams :class:`Started` (which replica took it), then what
:func:`webui.engine.stream.stream` yields — progress with previews, each finished batch's images,
then the result — so the caller sees the same events as in one process. Cancelling the streamed
response interrupts the generation within a step; Skip arrives through :class:`JobSignals`, a small
actor of the caller's that the replica waits on while the job runs (no polling).

Ray is imported by :func:`deployment` and :func:`signals_actor` only.
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
    threads: int | None = 1  # torch CPU threads per replica (None: as Ray set them)
    allow_pickle: bool = False
    allow_paths: bool = False  # request model names that are paths (the command line's engine allows them)
    allow_download: bool = True
    device: str = "auto"  # picked on the replica: its GPU when Ray gave it one
    dtype: str = "auto"
    memory: Any = None  # the ingress engine's MemorySettings and Limits (plain dataclasses)
    limits: Any = None
    preview_every: int = 5


@dataclass
class Started:
    """The first event of a stream: the replica that took the request (its Ray actor's name)."""

    replica: str
    actor: str


@dataclass
class BatchDone:
    """A finished batch's images, streamed before the next batch starts (the caller saves them)."""

    images: list[Any]


@dataclass
class Finished:
    """The last event of a stream: the result, and which replica made it. ``batches_sent``: the
    result's images are those of the :class:`BatchDone` events, left out here (sent once)."""

    result: Any
    replica: str
    batches_sent: bool = False


class EngineReplica:
    """The deployment's class (see :func:`deployment`): an engine, loaded models multiplexed."""

    def __init__(self, settings: ReplicaSettings) -> None:
        import torch

        from webui.engine.devices import pick_device, pick_dtype
        from webui.engine.pipeline import Engine

        if settings.threads is not None:
            torch.set_num_threads(max(1, settings.threads))
        self.settings = settings
        device = pick_device(settings.device)
        self.engine = Engine(
            models_dir=settings.models_dir,
            extra_models_dirs=settings.extra_models_dirs,
            default_model=settings.default_model,
            device=device,
            dtype="auto" if settings.dtype == "auto" else pick_dtype(settings.dtype, device),
            cache_size=settings.cache_size,  # as many as the multiplexing keeps
            allow_pickle=settings.allow_pickle,
            allow_paths=settings.allow_paths,
            allow_download=settings.allow_download,
            memory=settings.memory,
            limits=settings.limits,
        )
        self.replica, self.actor = _replica_id()

    async def load_model(self, model: str) -> Any:
        """The model's bundle; :func:`deployment` makes this Ray Serve's multiplexed loader."""
        return await self.load(model)

    async def load(self, model: str) -> Any:
        """The model's bundle, loaded on the torch thread (the event loop keeps streaming)."""
        from webui.engine import torch_thread

        name = None if model == DEFAULT_MODEL_ID else model
        return await asyncio.wrap_future(torch_thread.submit(self.engine.models.get, name))

    async def generate(
        self, request: GenerationRequest, job: str | None = None, signals: Any = None
    ) -> AsyncIterator[Any]:
        """Run ``request`` here and stream its events (see the module text). ``signals`` is the
        caller's :class:`JobSignals` actor and ``job`` this request's name there: each Skip sent
        for it skips the batch running at the time."""
        from webui.engine.control import GenerationControl
        from webui.engine.stream import stream

        yield Started(self.replica, self.actor)
        await self.load_model(model_id(request))  # multiplexed: this replica now has the model
        events: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        control = GenerationControl()
        watcher = asyncio.create_task(_forward_skips(signals, job, control)) if signals and job else None

        sent: list[Any] = []

        def on_batch(images: list[Any]) -> None:
            sent.extend(images)
            loop.call_soon_threadsafe(events.put_nowait, BatchDone(images))

        def work() -> None:
            try:
                iterator: Any = stream(  # a generator: closing it stops the engine
                    self.engine,
                    request,
                    control=control,
                    preview_every=self.settings.preview_every,
                    on_batch=on_batch,
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
                    same = len(item.images) == len(sent) and all(
                        a is b for a, b in zip(item.images, sent, strict=True)
                    )
                    if same:
                        item.images = []
                    yield Finished(item, self.replica, batches_sent=same)
                else:
                    yield item
        finally:  # also when the caller cancelled the response
            stop.set()
            if watcher is not None:
                watcher.cancel()
            await worker

    async def replica_id(self) -> str:
        return self.replica


_END = object()
DEFAULT_MODEL_ID = "(default)"  # the multiplexed model id of requests that name no model


def model_id(request: GenerationRequest) -> str:
    """The multiplexed model id a request is routed by."""
    return request.model or DEFAULT_MODEL_ID


def _replica_id() -> tuple[str, str]:
    """This replica's id and its Ray actor's name (in the "serve" namespace)."""
    try:
        from ray import serve

        replica = serve.get_replica_context().replica_id
        return replica.unique_id, replica.to_full_id_str()
    except Exception:  # outside Ray Serve (the class used directly)
        return f"pid-{os.getpid()}", ""


class JobSignals:
    """The caller's side of Skip: the ingress sends ``skip(job)``; the replica running ``job``
    waits in :meth:`wait` for the next one (and cancels that wait when the job ends). One
    asynchronous actor per ingress process (:func:`signals_actor`); the ingress forgets a job when
    its stream ends, so the actor holds only running jobs."""

    def __init__(self) -> None:
        self._skips: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def skip(self, job: str) -> None:
        async with self._changed:
            self._skips[job] = self._skips.get(job, 0) + 1
            self._changed.notify_all()

    async def wait(self, job: str, seen: int) -> int:
        """The number of skips sent for ``job``, once it is above ``seen``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._skips.get(job, 0) > seen)
            return self._skips[job]

    async def forget(self, job: str) -> None:
        async with self._changed:
            self._skips.pop(job, None)


def signals_actor() -> Any:
    """This process's :class:`JobSignals` actor (started on first use; it ends with the process)."""
    import ray

    name = f"latent-studio-signals-{ray.get_runtime_context().get_job_id()}"
    actor = ray.remote(num_cpus=0)(JobSignals)
    return actor.options(name=name, get_if_exists=True, max_concurrency=1000).remote()


async def _forward_skips(signals: Any, job: str, control: Any) -> None:
    """Flip ``control``'s skip for every Skip the caller sends for ``job``, until cancelled."""
    import ray

    seen = 0
    while True:
        waiting = signals.wait.remote(job, seen)
        try:
            seen = await waiting
        except asyncio.CancelledError:  # the job ended: release the wait in the actor too
            ray.cancel(waiting)
            raise
        except Exception:  # the caller went away: its cancellation stops the generation
            return
        control.skip()


DEPLOYMENT = "latent-studio-engine"  # the deployment's name in the application


def deployment(settings: ReplicaSettings, options: dict[str, Any] | None = None) -> Any:
    """The bound Ray Serve application of :class:`EngineReplica` with these settings.

    ``options`` are the deployment's (``num_replicas`` or ``autoscaling_config``,
    ``ray_actor_options``, ``max_queued_requests``...: see
    :func:`webui.serve.options.deployment_options`); a replica runs one generation at a time
    (``max_ongoing_requests`` 1: its device), more wait in Ray's queue.
    """
    from ray import serve

    class Replica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=settings.cache_size)
        async def load_model(self, model: str) -> Any:
            return await self.load(model)

    options = {**(options or {}), "max_ongoing_requests": 1}
    if "autoscaling_config" not in options:
        options.setdefault("num_replicas", 1)
    return serve.deployment(Replica, name=DEPLOYMENT, **options).bind(settings)
