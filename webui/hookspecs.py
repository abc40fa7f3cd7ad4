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

API versions: this contract and ``webui.api`` together are plugin API ``webui.api.API_VERSION``
(now 1); the number goes up when a hook or a name there changes incompatibly (new hooks, new
arguments and new names do not change it). A plugin declares the versions it supports with a
module (or object) attribute, a whole number or a collection of them::

    LATENT_STUDIO_API = 1          # or (1, 2)

A plugin whose declaration does not include the running version is not registered, and its record
says why, naming both versions (``needs plugin API 2; this Latent Studio provides API 1``), in
``launch.py plugins`` and the web app's Plugins tab. A plugin that declares nothing is loaded, for
compatibility with plugins written before versions were checked. The built-ins declare it too.

Testing a plugin: ``webui.testing`` builds a tiny offline model and an engine with the plugin
registered, runs a request on each task and checks the plugin's hook names and arguments against
this contract (``check_hooks``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from webui.engine.bundle import ModelBundle
    from webui.engine.context import (
        Conditioning,
        DenoiserCall,
        GuidanceCombine,
        LoadContext,
        ModelEntry,
        ModelPatches,
        OutputImage,
        RunContext,
        SecondPass,
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
def register_models(
    register: Callable[[ModelEntry], None], models_dir: str | None, models_dirs: list[str]
) -> None:
    """List the models this plugin can offer (for the model pickers and ``launch.py models``).

    Called on demand (each refresh), so keep it cheap: read directory entries, not weights.
    ``register(ModelEntry(name, source, kind))`` with ``kind`` one of ``"checkpoint"``,
    ``"vae"``, ``"controlnet"``, ``"lora"``, ``"embedding"``, ``"upscaler"``; ``source`` is what ``load_model``
    will receive. ``models_dir`` is the main models folder, or None; ``models_dirs`` lists every
    models root in order (``models_dir`` first, then ``--extra-models-dir`` folders). The first
    registration of a (kind, name) wins.
    """


@hookspec
def register_upscalers(register: Callable[..., None], models_dirs: list[str]) -> None:
    """Offer image upscalers (the Extras tab, ``launch.py upscale``, the hires fix, the API's
    ``/sdapi/v1/upscalers``).

    ``register(name, *, resample=None, path=None, scale=None)``: ``resample(image, (width,
    height))`` returns the PIL image resized (no model), or ``path`` is a model file that
    ``engine.upscalers`` loads with spandrel (ESRGAN, Real-ESRGAN, SwinIR, DAT... detected from the
    weights; ``.safetensors``, pickles only with ``--allow-pickle``) and runs in tiles. ``scale`` is
    shown in listings. Called on demand (each listing, so new files show), so keep it cheap;
    ``models_dirs`` lists every models root. The first registration of a name (case-insensitive)
    wins; built-ins: Lanczos, Nearest and the files of ``upscalers/``, ``ESRGAN/``,
    ``RealESRGAN/``, ``SwinIR/``, ``DAT/`` and ``upscale_models/``. Example::

        @hookimpl
        def register_upscalers(register):
            register("Box", resample=lambda image, size: image.resize(size, Image.Resampling.BOX))
    """


@hookspec
def register_fields(register: Callable[..., Any]) -> None:
    """Declare request fields, once each: ``register(name, kind, **options)`` or
    ``register(webui.api.Field(...))``. Called once when an engine is created (and by the command
    line before it parses ``generate``'s options), built-ins first.

    From the declaration the host derives the request value (``request.extra[name]``, checked and
    filled with the default before ``prepare_request``; a bad value fails the request with a
    one-line message naming the field), the web UI control on the tabs of the field's ``tasks``
    (no gradio import needed), a ``launch.py generate`` flag (``--name`` and ``--set name=value``),
    the infotext entry and PNG Info's reading and "Send to". See :class:`webui.fields.Field` for
    every option. A name registered twice is refused (the second plugin's hook fails and is
    reported). Example::

        @hookimpl
        def register_fields(register):
            register("cfg_rescale", "float", default=0.0, minimum=0.0, maximum=1.0, step=0.05,
                     label="CFG rescale", help="0 = off", infotext="CFG rescale")
    """


@hookspec
def register_tasks(register: Callable[..., Any]) -> None:
    """Declare tasks: ``register(name, label, requires=(field names...), message="...")``. A task
    is only a name for a set of inputs run by the one denoising loop (the conditionings come from
    ``provide_conditioning``); it names the outputs sub-folder, a tab's web API endpoint and the
    tasks a field applies to. Called before ``register_fields``. Built-ins: txt2img, img2img,
    inpaint, seg2img. Pair it with a tab (``register_ui_tabs``: ``register(id, label, task=name)``
    builds a generation tab from the task's fields). Example::

        @hookimpl
        def register_tasks(register):
            register("sketch2img", "Sketch to image", requires=("sketch",),
                     message="draw or upload a sketch first")
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
    ``register_upscalers``, ``register_fields``, ``register_tasks``, ``register_ui_tabs``), a failure
    here is recorded against the plugin, logged and shown in the web app's Plugins tab, and
    everything else goes on. A request hook that raises anything but a ``LatentStudioError`` fails
    the request with a ``PluginError`` naming the plugin and the hook.
    """


# --- Request preparation ----------------------------------------------------------------------


@hookspec
def prepare_request(request: GenerationRequest, context: RunContext) -> None:
    """Transform the validated request in place before anything is computed (styles, size
    rounding, cropping for "only masked" inpainting...). The request is validated again after
    this hook, so a plugin cannot smuggle in invalid values. ``context.state`` may carry what a
    later hook (e.g. ``postprocess_images``) needs.
    """


@hookspec
def patch_model(request: GenerationRequest, context: RunContext, patches: ModelPatches) -> None:
    """Change the model for this request only: add each change to ``patches`` with
    ``patches.add(name, apply, undo)`` or ``patches.enter(name, context_manager)``.

    The hook only collects. The engine then applies the patches in the order they were added
    (pluggy's call order, then each plugin's own order), under the model's lock, before the first
    batch; it undoes them in reverse order when the request ends, also on an error (when a later
    patch fails to apply, only the ones already applied are undone), an interrupt or a skip, so the
    cached model is exactly what it was for the next request. Called once per request, after
    ``prepare_request``; ``context.width``/``height`` are known. Built-ins: LoRAs named in the prompt
    (``<lora:name:0.8>``) and textual-inversion embeddings. Example::

        @hookimpl
        def patch_model(request, context, patches):
            unet = context.bundle.unet
            saved = unet.conv_in.bias.detach().clone()
            patches.add("brighter", lambda: unet.conv_in.bias.data.add_(0.1),
                        lambda: unet.conv_in.bias.data.copy_(saved))
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
def wrap_denoiser(
    request: GenerationRequest, context: RunContext
) -> Callable[[DenoiserCall], DenoiserCall] | None:
    """Wrap the denoiser call: return a function that takes the next ``call`` and returns a new
    one, or None to leave it alone.

    ``call(model_input, step) -> noise_pred`` runs the UNet (with every ControlNet) on the scaled
    latents (doubled as ``[unconditional; conditional]`` when ``step.guided``); ``step`` is a
    :class:`~webui.engine.context.DenoiseStep` (``index``, ``total``, ``timestep``, ``sigma``,
    ``request``, ``context``, ``encoder_hidden_states``...). Called once per batch; the wrapped call
    runs once per sampler evaluation. Wrappers compose: the first implementation pluggy calls is the
    outermost (a community plugin wraps the built-ins unless it uses ``trylast=True``). Example::

        @hookimpl
        def wrap_denoiser(request, context):
            def wrap(call):
                def counted(model_input, step):
                    print("step", step.index, "timestep", int(step.timestep))
                    return call(model_input, step)
                return counted
            return wrap
    """


@hookspec
def wrap_guidance(
    request: GenerationRequest, context: RunContext
) -> Callable[[GuidanceCombine], GuidanceCombine] | None:
    """Wrap classifier-free guidance's combination step: return a function that takes the next
    ``combine`` and returns a new one, or None to leave it alone.

    ``combine(uncond, cond, scale, step) -> noise_pred``; the built-in one is
    ``uncond + scale * (cond - uncond)``. Used only when the request is guided (CFG scale above 1).
    Called once per batch; composed like ``wrap_denoiser`` (the first implementation pluggy calls
    is outermost). The built-in CFG rescale (``extra["cfg_rescale"]``) is such a wrapper. Example::

        @hookimpl
        def wrap_guidance(request, context):
            def wrap(combine):
                return lambda uncond, cond, scale, step: combine(uncond, cond, scale * 0.9, step)
            return wrap
    """


@hookspec
def on_step(step: StepInfo) -> None:
    """Notification after each denoising step (progress, previews, logging, interrupting)."""


@hookspec(firstresult=True)
def second_pass(request: GenerationRequest, context: RunContext, latents: torch.Tensor) -> SecondPass | None:
    """After a batch's denoising loop, before decoding: return a
    :class:`~webui.engine.context.SecondPass` to denoise ``latents`` again (upscaled, at another
    size, with other steps or prompts; the hires fix), or ``None``. The first answer wins; it is
    not asked when the batch was interrupted or skipped. ``context.engine.decode_latents`` and
    ``encode_images`` go between latents and pixels (an image upscaler in between)."""


# --- Output -----------------------------------------------------------------------------------


@hookspec
def postprocess_images(images: list[OutputImage], request: GenerationRequest, context: RunContext) -> None:
    """Transform finished images in place (replace ``OutputImage.image``; e.g. paste an
    "only masked" crop back, upscale, watermark). Runs before the metadata is written."""


@hookspec
def write_metadata(
    parameters: dict[str, Any], image: OutputImage, request: GenerationRequest, context: RunContext
) -> None:
    """Add or change ``parameters`` entries (A1111 infotext keys such as ``"Steps"``) in place.
    The built-in writer adds the standard keys first; entries with a ``None`` value are left out."""


@hookspec(firstresult=True)
def parse_metadata(text: str) -> dict[str, Any] | None:
    """Parse a ``parameters`` text into a dict (``"Prompt"``, ``"Negative prompt"``, keys...).
    First result wins; the built-in reads A1111's infotext format."""


# --- Web UI -----------------------------------------------------------------------------------


@hookspec
def register_ui_tabs(register: Callable[..., None]) -> None:
    """Add tabs to the web UI: call ``register(id, label, build=None, order=100, task=None)``.

    Two kinds of tab:

    * ``register(id, label, task="sketch2img")`` (no ``build``): the core builds a generation tab
      for that task from the field registry — the shared controls, every field whose ``tasks``
      include it, progress, preview, Interrupt/Skip, the gallery, saving and PNG Info's "Send to" —
      so a plugin adds a task tab without importing gradio;
    * ``build(ui)`` is called inside the tab's ``gr.Tab`` context with the
      :class:`webui.ui.controls.UIContext` (the service, the field registry, sampler names, the
      default model) and creates the tab's components; a generation tab calls
      ``webui.ui.controls.generation_tab`` (and may build its own widgets for some fields).

    The tab ``id`` (``[a-z][a-z0-9_-]*``) keys everything the tab makes: element ids
    (``<id>-prompt``), the Generate API endpoint (``<id>``, ``<id>_interrupt``, ``<id>_skip``) and
    PNG Info's "Send to" target, so a plugin tab that reuses a built-in task never collides with the
    built-in tab. Tabs are shown by ``order``; the built-ins are txt2img (10), img2img (20), inpaint
    (30), seg2img (40), pnginfo (90) and plugins (1000). The first registration of an ``id`` wins,
    so a community plugin can replace a built-in tab by registering its id. A tab whose ``build``
    fails, or whose id is refused, shows the error instead.
    Called only when the web UI starts, so gradio is imported by the tab's ``build``, not at
    plugin import.
    """
