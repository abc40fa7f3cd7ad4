"""The plugin contract: every hook Latent Studio calls, grouped by phase.

A plugin is a module (or class instance) with functions named like the hooks below, decorated with
``webui.api.hookimpl``. Implement only the hooks you need and only the arguments you use (pluggy
passes arguments by name). Built-in features use these same hooks.

Hook kinds:

* registries take a ``register`` callback; the host validates and de-duplicates;
* "firstresult" hooks answer "who handles this?": the first non-``None`` answer wins;
* transform hooks mutate the typed object they are given, in place, and return nothing;
* notification hooks return nothing.

Order: pluggy calls the most recently registered plugin first. Built-ins are registered before
community plugins, so a community plugin's transform runs first unless it asks for
``@hookimpl(trylast=True)``, and its firstresult answer wins over a built-in's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from webui.engine.bundle import ModelBundle
    from webui.engine.context import (
        Conditioning,
        LoadContext,
        ModelEntry,
        OutputImage,
        RunContext,
        StepInfo,
    )
    from webui.request import GenerationRequest

PROJECT = "latent_studio"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Startup and registries -------------------------------------------------------------------


@hookspec
def register_schedulers(register: Callable[..., None]) -> None:
    """Add samplers. Called once when an engine is created.

    ``register(name, factory, *, aliases=(), **config_overrides)``: ``factory`` is a diffusers
    scheduler class (built with ``from_config(model_config, **config_overrides)``) or a callable
    taking the merged config dict and returning a scheduler. Registering an existing name replaces
    that sampler. Example::

        @hookimpl
        def register_schedulers(register):
            register("Euler Karras", EulerDiscreteScheduler, use_karras_sigmas=True)
    """


@hookspec
def register_models(register: Callable[[ModelEntry], None], models_dir: str | None,
                    models_dirs: list[str]) -> None:
    """List the models this plugin can offer (for the model pickers and ``launch.py models``).

    Called on demand (each refresh), so keep it cheap: read directory entries, not weights.
    ``register(ModelEntry(name, source, kind))`` with ``kind`` one of ``"checkpoint"``,
    ``"vae"``, ``"controlnet"``, ``"lora"``, ``"embedding"``; ``source`` is what ``load_model``
    will receive. ``models_dir`` is the main models folder, or None; ``models_dirs`` lists every
    models root in order (``models_dir`` first, then ``--extra-models-dir`` folders). The first
    registration of a (kind, name) wins.
    """


@hookspec(firstresult=True)
def load_model(source: str, kind: str, context: LoadContext) -> ModelBundle | Any | None:
    """Load a model, or return None if this plugin does not handle ``source``.

    ``kind`` is ``"checkpoint"`` (return a :class:`~webui.engine.bundle.ModelBundle`) or
    ``"controlnet"`` (return a ``ControlNetModel``). Raise a ``LatentStudioError`` subclass
    (``ModelNotFoundError``, ``ModelLoadError``) when the source is yours but cannot be loaded.
    First result wins.
    """


@hookspec
def startup(engine: Any) -> None:
    """Notification: an engine was created (``engine.plugins``, ``engine.schedulers`` are ready).

    Like every start-up hook (``startup``, ``register_schedulers``, ``register_models``,
    ``register_ui_tabs``), a failure here is recorded against the plugin, logged and shown in the
    web app's Plugins tab, and everything else goes on. A request hook that raises anything but a
    ``LatentStudioError`` fails the request with a ``PluginError`` naming the plugin and the hook.
    """


# --- Request preparation ----------------------------------------------------------------------


@hookspec
def prepare_request(request: GenerationRequest, context: RunContext) -> None:
    """Transform the validated request in place before anything is computed (styles, size
    rounding, cropping for "only masked" inpainting...). The request is validated again after
    this hook, so a plugin cannot smuggle in invalid values. ``context.state`` may carry what a
    later hook (e.g. ``postprocess_images``) needs.
    """


# --- Conditioning -----------------------------------------------------------------------------


@hookspec
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    """Add this plugin's part to ``conditioning`` in place, for one batch.

    Built-ins: text (prompt embeddings), init image (img2img), masked image (inpainting),
    segmentation map (ControlNet). Leave fields you do not own untouched; append to
    ``conditioning.controls`` rather than replacing it. Add ``parameters`` entries to
    ``conditioning.metadata``.
    """


# --- Sampling ---------------------------------------------------------------------------------


@hookspec
def on_step(step: StepInfo) -> None:
    """Notification after each denoising step (progress, previews, logging, interrupting)."""


# --- Output -----------------------------------------------------------------------------------


@hookspec
def postprocess_images(images: list[OutputImage], request: GenerationRequest, context: RunContext) -> None:
    """Transform finished images in place (replace ``OutputImage.image``; e.g. paste an
    "only masked" crop back, upscale, watermark). Runs before the metadata is written."""


@hookspec
def write_metadata(parameters: dict[str, Any], image: OutputImage, request: GenerationRequest,
                   context: RunContext) -> None:
    """Add or change ``parameters`` entries (A1111 infotext keys such as ``"Steps"``) in place.
    The built-in writer adds the standard keys first; entries with a ``None`` value are left out."""


@hookspec(firstresult=True)
def parse_metadata(text: str) -> dict[str, Any] | None:
    """Parse a ``parameters`` text into a dict (``"Prompt"``, ``"Negative prompt"``, keys...).
    First result wins; the built-in reads A1111's infotext format."""


# --- Web UI -----------------------------------------------------------------------------------


@hookspec
def register_ui_tabs(register: Callable[..., None]) -> None:
    """Add tabs to the web UI: call ``register(id, label, build, order=100)``.

    ``build(ui)`` is called inside the tab's ``gr.Tab`` context with the
    :class:`webui.ui.controls.UIContext` (the service, sampler names, the default model) and
    creates the tab's components. A generation tab builds itself with
    ``webui.ui.controls.generation_tab`` and so gets the shared controls, progress, preview,
    Interrupt/Skip, the gallery and saving; PNG Info can then send parameters to it. Tabs are
    shown by ``order``; the built-ins are txt2img (10), img2img (20), inpaint (30), seg2img (40),
    pnginfo (90) and plugins (1000: every plugin and its error, if any). The first registration of
    an ``id`` wins, so a community plugin can replace a built-in tab by registering its id. A tab
    whose ``build`` fails shows the error instead.
    Called only when the web UI starts, so gradio is imported by the tab's ``build``, not at
    plugin import.
    """
