"""What the web UI asks of the engine, in plain Python: no gradio here, and no torch.

:class:`StudioService` is shared by every browser session, but holds nothing that belongs to one
user: the model choice and all settings travel in each :class:`~webui.request.GenerationRequest`.
The only per-session state is the switch that interrupts that session's own running generation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webui.engine.control import GenerationControl
from webui.engine.model_info import ModelInfo, read_model_info
from webui.engine.segmap import ADE20K, Palette, find_palette
from webui.engine.stream import Progress, stream
from webui.errors import LatentStudioError
from webui.output import BatchSaver, output_dir
from webui.plot import enabled, execute, grid_folder, make_plan, source_names
from webui.request import GenerationRequest

__all__ = ["Finished", "GenerationFailed", "ModelInfo", "StudioService"]

log = logging.getLogger(__name__)


@dataclass
class Finished:
    """A generation's end: what the gallery shows, the infotexts and seeds, in the same order.

    ``files`` holds (saved PNG's path, caption) per image, or (the PIL image, caption) for an
    image that could not be saved; ``warning`` then says in one line why and where.
    """

    files: list[tuple[Any, str]]
    infotexts: list[str]
    seeds: list[int]
    seconds: float
    interrupted: bool
    warning: str | None = None


class GenerationFailed(LatentStudioError):
    """A request failed after some of its batches had finished; the message says what it was and
    where those batches' images were saved."""


class StudioService:
    """The engine as the web UI uses it: list models, describe them, run and stop generations."""

    def __init__(self, engine: Any, outputs_dir: str | Path, *, preview_every: int = 5) -> None:
        self.engine = engine
        self.outputs_dir = Path(outputs_dir)
        self.preview_every = preview_every
        # what the Plugins tab may do (a webui.ui.server.PluginControl); set by the server
        self.plugin_control: Any = None
        self._controls: dict[str, GenerationControl] = {}
        self._lock = threading.Lock()
        # one generation on the device at a time, whoever asks (web app clicks, HTTP API jobs); a
        # semaphore, not a lock: gradio may resume a generator on another thread than it began on
        # as many at once as the engine runs at once: 1, or its Ray Serve replicas (webui.serve)
        self.concurrency = max(1, int(getattr(engine, "concurrency", 1)))
        self._device = threading.BoundedSemaphore(self.concurrency)

    @contextmanager
    def device_turn(self) -> Iterator[None]:
        """Hold the device's turn: wait until no other generation runs, keep others waiting until
        the block ends. :meth:`run` takes it itself unless told that its caller holds it."""
        self._device.acquire()
        try:
            yield
        finally:
            self._device.release()

    # -- models ------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """The checkpoints on offer (rescanned on every call, so "refresh" sees new folders)."""
        return [entry.name for entry in self.engine.models.list("checkpoint")]

    def names(self, kind: str) -> list[str]:
        """Listed names of one kind ("vae", "lora", "embedding", "controlnet"...), rescanned."""
        return [entry.name for entry in self.engine.models.list(kind)]

    def upscaler_names(self, *, latent: bool = False) -> list[str]:
        """The image upscalers (rescanned), after the latent ones (the hires fix's) when ``latent``."""
        upscalers = getattr(self.engine, "upscalers", None)
        images = upscalers.names() if upscalers is not None else []
        hires = self.engine.plugins.get_plugin("webui.builtin.hires") if latent else None
        return [*(hires.LATENT_UPSCALERS if hires is not None else ()), *images]

    def controlnet_palette(self, name: str | None) -> Palette | None:
        """The class palette of a listed ControlNet: its ``palette.json`` (in its folder, or
        ``<file>.palette.json`` beside a single file), else ADE20K; None for an unknown name."""
        if not name:
            return None
        try:
            path = Path(self.engine.models.source_of(name, "controlnet"))
        except LatentStudioError:
            return None
        try:
            return find_palette(path)
        except LatentStudioError as error:  # the page keeps working; loading the ControlNet will say why
            log.warning("%s", error)
            return ADE20K

    def default_model_name(self) -> str | None:
        """The listed name of the model a request without one gets (the first listed as a fallback)."""
        entries = self.engine.models.list("checkpoint")
        try:
            wanted = self.engine.models.resolve(None)
        except LatentStudioError:  # no model at all: the UI still opens and says so on Generate
            wanted = None
        if wanted is not None:
            real = Path(wanted).expanduser().resolve()
            for entry in entries:
                if entry.name == wanted or Path(entry.source).expanduser().resolve() == real:
                    return entry.name
        return entries[0].name if entries else None

    def model_info(self, name: str | None) -> ModelInfo:
        """Native size, recommended guidance, vocabulary, examples and palette of a model, read
        from its files by the reader the engine's bundle shares its rules with
        (:func:`webui.engine.model_info.read_model_info`); the defaults for an unknown name."""
        return read_model_info(self._source_path(name), name or "")

    def _source_path(self, name: str | None) -> Path | None:
        """The model folder or file of a listed name, under the engine's path rules (a web name
        never reaches a folder outside the model folders); None for unknown names."""
        models = self.engine.models
        try:
            source = models.source_of(models.resolve(name or None))
        except LatentStudioError:
            return None
        path = Path(source)
        return path if path.exists() else None

    # -- generations -------------------------------------------------------------------------

    def run(
        self, request: GenerationRequest, session: str, *, save: bool = True, turn: bool = True
    ) -> Iterator[Progress | Finished]:
        """Run ``request`` for browser session ``session``: progress events, then :class:`Finished`.

        Each batch's images are saved to ``outputs/<task>/<date>/NNNNN-<seed>.png`` with their
        infotext as soon as the batch is decoded, on the generating thread: they stay on disk when
        a later batch fails, the session interrupts, the browser goes away or the process dies.
        When the request fails after some batches, :class:`GenerationFailed` says how many images
        were saved and where; when saving fails, :class:`Finished` still carries the images, with a
        warning. A second run of the same session replaces the first's interrupt switch (the queue
        runs one generation at a time anyway).

        ``save=False`` keeps the images in :class:`Finished` without writing files (an HTTP API
        call that asks for no saving). The generation waits for the device's turn
        (:meth:`device_turn`) unless ``turn=False`` says the caller holds it already.
        """
        directory = output_dir(self.outputs_dir, request.task)
        saver = BatchSaver(directory, shown_as=self._shown(directory)) if save else _Keeper(directory)
        control = GenerationControl()
        # an X/Y/Z plot: every cell planned and checked now, before waiting for the device
        plan = (
            make_plan(request, self.engine.fields, limits=self.engine.limits, names=source_names(self.engine))
            if enabled(request)
            else None
        )
        with self._lock:
            self._controls[session] = control
        try:
            with self.device_turn() if turn else nullcontext():
                try:
                    events = (
                        stream(
                            self.engine,
                            request,
                            control=control,
                            preview_every=self.preview_every,
                            on_batch=saver,
                        )
                        if plan is None
                        else execute(
                            self.engine,
                            plan,
                            control=control,
                            on_batch=saver,
                            grid_dir=grid_folder(self.outputs_dir, request.task) if save else None,
                            preview_every=self.preview_every,
                        )
                    )
                    for event in events:
                        if isinstance(event, Progress):
                            yield event
                            continue
                        yield self._finished(event, saver)
                except Exception as error:
                    failed = self._failed(error, saver)
                    if failed is error:
                        raise
                    raise failed from error
        finally:
            with self._lock:
                if self._controls.get(session) is control:
                    del self._controls[session]

    def interrupt(self, session: str) -> bool:
        """Stop ``session``'s generation after the current step, keeping finished images."""
        control = self._controls.get(session)
        if control is not None:
            control.interrupt()
        return control is not None

    def skip(self, session: str) -> bool:
        """Drop ``session``'s current batch and go on with the next one."""
        control = self._controls.get(session)
        if control is not None:
            control.skip()
        return control is not None

    def busy(self, session: str) -> bool:
        return session in self._controls

    def sessions_running(self) -> int:
        """How many sessions have a generation running or waiting to stop."""
        with self._lock:
            return len(self._controls)

    def _shown(self, directory: Path) -> str:
        """``directory`` as web users see it: from the outputs folder's own name down (the
        server's path above it is nobody's business)."""
        try:
            inner = directory.relative_to(self.outputs_dir)
        except ValueError:
            return directory.name
        return str(Path(self.outputs_dir.name) / inner) if self.outputs_dir.name else str(inner)

    def _finished(self, result: Any, saver: BatchSaver) -> Finished:
        saver.finish(result.images)  # batches the engine did not hand over on the way, if any
        files: list[tuple[Any, str]] = [
            (str(path) if path is not None else item.image, f"seed {item.seed}") for item, path in saver.items
        ]
        infotexts = [item.parameters.get("infotext", "") for item, _ in saver.items]
        seeds = [item.seed for item, _ in saver.items]
        warning = saver.warning()
        grids = getattr(result, "grids", None) or []  # an X/Y/Z plot's grids come first, as in A1111
        if grids:
            files = [(str(g.path) if g.path else g.image, "grid") for g in grids] + files
            infotexts = [g.infotext for g in grids] + infotexts
            seeds = [result.plan.base.seed] * len(grids) + seeds
            failed = next((g.error for g in grids if g.error), None)
            warning = warning or (f"the grid could not be saved: {failed}" if failed else None)
        if warning is not None:
            log.warning("%s (%s)", warning, saver.directory)
        return Finished(
            files=files,
            infotexts=infotexts,
            seeds=seeds,
            seconds=result.seconds,
            interrupted=result.interrupted,
            warning=warning,
        )

    def _failed(self, error: Exception, saver: BatchSaver) -> Exception:
        """``error`` itself when no batch had finished; else one naming what was kept and where."""
        note = saver.summary()
        if note is None:
            return error
        if isinstance(error, LatentStudioError):
            return GenerationFailed(f"{error} ({note})")
        log.error(
            "generation failed (%s)", saver.directory, exc_info=error
        )  # a bug or the device: keep the trace
        return GenerationFailed(f"generation failed: {type(error).__name__}: {error} ({note})")


class _Keeper(BatchSaver):
    """A :class:`BatchSaver` that keeps each batch's images without writing them (``save=False``)."""

    def __call__(self, images: Iterable[Any]) -> None:
        self.items.extend((item, None) for item in images)

    def warning(self) -> str | None:
        return None

    def summary(self) -> str | None:
        return None
