"""Running a generation in the background and following it step by step.

:func:`stream` runs :meth:`Engine.generate` on the process's torch thread
(:mod:`webui.engine.torch_thread`) and yields :class:`Progress` events
(step counts, an ETA and, every few steps, a cheap preview of the latents) and finally the
:class:`GenerationResult`. Closing the iterator early (a user left, a web request was cancelled)
interrupts the generation and waits for the worker, so the device is never left busy by nobody.
``on_batch`` runs on the torch thread as each batch finishes, so what it does (saving the
images) happens even when nobody reads the iterator any more.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from webui.engine import torch_thread
from webui.engine.control import GenerationControl
from webui.request import GenerationRequest

if TYPE_CHECKING:
    from webui.engine.context import StepInfo

__all__ = ["Progress", "stream"]


@dataclass
class Progress:
    """Where a running generation is. ``step`` counts from 1 in the current batch of ``total``
    steps; ``done``/``overall`` count steps over all batches. ``preview`` holds low-resolution
    previews of the batch's images on preview steps, else ``None``."""

    step: int
    total: int
    batch: int
    batches: int
    done: int
    overall: int
    elapsed: float
    eta: float | None
    preview: list[Image.Image] | None = field(default=None, repr=False)

    @property
    def fraction(self) -> float:
        return self.done / self.overall if self.overall else 0.0

    def describe(self) -> str:
        text = f"Step {self.step}/{self.total}"
        if self.batches > 1:
            text += f", batch {self.batch}/{self.batches}"
        text += f" · {self.elapsed:.1f}s"
        if self.eta is not None:
            text += f", about {self.eta:.1f}s left"
        return text


_DONE = object()


def stream(
    engine: Any,
    request: GenerationRequest,
    *,
    control: GenerationControl | None = None,
    preview_every: int = 5,
    on_batch: Callable[[list[Any]], None] | None = None,
) -> Iterator[Progress | Any]:
    """Yield :class:`Progress` while ``request`` runs, then its ``GenerationResult``.

    ``preview_every`` is how often (in steps) a preview is made; 0 turns previews off.
    ``on_batch`` is ``Engine.generate``'s: called on the torch thread with each finished batch's
    images, before the next batch starts, also after the consumer went away. Errors of the
    generation are raised from the iterator, after the worker has finished and memory was
    released (so whatever ``on_batch`` did is complete by then).
    """
    remote = getattr(engine, "stream", None)
    if remote is not None:  # an engine that runs elsewhere (webui.serve.client.RayEngine) streams itself
        yield from remote(request, control=control, preview_every=preview_every, on_batch=on_batch)
        return
    # torch comes with the previews, when a generation runs: the web UI imports this module without it
    from webui.engine.preview import preview_images

    control = control or GenerationControl()
    events: queue.Queue[Any] = queue.Queue()
    started = time.perf_counter()
    batches = max(1, int(request.batch_count))

    def on_step(info: StepInfo) -> None:
        batch = info.context.batch_index + 1
        done = info.context.batch_index * info.total + info.step
        overall = batches * info.total
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (overall - done) if done else None
        preview = None
        if preview_every and (info.step % preview_every == 0) and info.step < info.total:
            preview = preview_images(info.context.bundle, info.latents)
        events.put(Progress(info.step, info.total, batch, batches, done, overall, elapsed, eta, preview))

    def work() -> None:
        try:
            events.put(engine.generate(request, callback=on_step, control=control, on_batch=on_batch))
        except BaseException as error:  # handed to the consumer, raised there
            events.put(error)
        finally:
            events.put(_DONE)

    if torch_thread.on_torch_thread():  # nested in a generation: a thread of its own, or it waits for itself
        future: futures.Future[None] = futures.Future()

        def nested() -> None:
            work()
            future.set_result(None)

        threading.Thread(target=nested, name="latent-studio-generate", daemon=True).start()
    else:  # the process's torch thread (webui.engine.torch_thread)
        future = torch_thread.submit(work)
    failure: BaseException | None = None
    try:
        while True:
            item = events.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                failure = item
                continue
            yield item
    finally:
        if not future.done():  # the consumer went away: stop the loop within a step
            control.interrupt()
        futures.wait([future])
        if failure is not None:
            from webui.engine.memory import release_memory

            release_memory(getattr(engine, "device", None))
    if failure is not None:
        raise failure
