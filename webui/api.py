"""The public API: the one module that plugins and Python users import from.

Plugins::

    from webui.api import hookimpl

    @hookimpl
    def register_schedulers(register):
        ...

Python users::

    from webui.api import Engine, GenerationRequest

    engine = Engine(models_dir="models")
    result = engine.generate(GenerationRequest(prompt="a red circle", steps=20, seed=1))
    result.images[0].image.save("out.png")

Everything a plugin needs is here (the built-in plugins in ``webui/builtin/`` import nothing else
from ``webui``, and a test keeps it so). Besides the types and hooks, the helpers come in groups:
image helpers for conditioning plugins (``image_to_tensor``, ``mask_to_tensor``,
``control_image_tensor``, ``snap_to_palette``) and helpers for model loaders and model listing
(``ModelFolders``, ``resolve_in_root``, ``HUB_ID``, ``file_sha256``, ``model_hash``,
``WEIGHT_SUFFIXES``, ``load_single_file``, ``load_single_file_controlnet``, ``load_vae``,
``find_palette``: a ControlNet's ``palette.json`` or ``<name>.palette.json``), and the prompt
styles of ``styles.csv`` (``load_styles(engine)``, ``apply_styles``, ``check_names``, ``Style``).
``webui.testing`` has helpers for a plugin's tests (a tiny offline model and ControlNet, an engine
with the plugin registered, a request on each task, the web UI built in-process, a check of the hook
signatures).

Request fields and tasks: ``Field`` and ``TaskSpec`` (declared with the ``register_fields`` and
``register_tasks`` hooks), ``FieldRegistry`` (``engine.fields``, also ``context.fields``: every
declared field and task), and the built-in declarations ``BUILTIN_FIELDS`` and ``BUILTIN_TASKS``.

From a hook, ``context.engine`` is the :class:`Engine`; these parts of it are public too:
``engine.models`` (``get(name)`` a checkpoint's bundle, ``get_controlnet(name)`` a ControlNet by its
listed name or folder, ``list(kind)`` the listed ``ModelEntry`` items, ``source_of(name, kind)``,
``models_dir``), ``engine.schedulers`` (``names()``), ``engine.upscalers`` (an :class:`UpscalerRegistry`:
``names()``, ``upscale(image, name, scale=... | size=...)``), ``engine.fields`` and ``engine.limits``.

``API_VERSION`` changes when something here or in the hooks changes incompatibly. A plugin says
which versions it was written for with a module (or object) attribute::

    LATENT_STUDIO_API = 1          # or a collection: (1, 2)

A plugin that declares versions without the running one is not loaded; its error, shown by
``launch.py plugins`` and the web app's Plugins tab, names both (``needs plugin API 2; this Latent
Studio provides API 1``). A plugin that declares nothing is loaded, as before versions existed.
"""

from __future__ import annotations

from webui.engine.bundle import ModelBundle
from webui.engine.context import (
    Conditioning,
    ControlInput,
    DenoiserCall,
    DenoiseStep,
    GenerationControl,
    GuidanceCombine,
    LoadContext,
    ModelEntry,
    ModelPatches,
    OutputImage,
    RunContext,
    SecondPass,
    StepInfo,
)
from webui.engine.embeddings import STATE_KEY as EMBEDDINGS_STATE
from webui.engine.embeddings import EmbeddingLibrary
from webui.engine.files import WEIGHT_SUFFIXES
from webui.engine.folders import HUB_ID, ModelFolders, file_sha256, model_hash, resolve_in_root
from webui.engine.lora import apply_loras, lora_metadata, prompt_loras
from webui.engine.memory import MemoryPlan, MemorySettings
from webui.engine.pipeline import Engine, GenerationResult
from webui.engine.reader import WINDOW as READER_WINDOW
from webui.engine.reader import PromptReader, Reading, load_reader, read_prompt_states
from webui.engine.schedulers import SchedulerRegistry
from webui.engine.segmap import ADE20K, Palette, control_image_tensor, find_palette, snap_to_palette
from webui.engine.single_file import load_single_file, load_single_file_controlnet
from webui.engine.text import PromptEmbeds, encode_prompts
from webui.engine.upscalers import UpscalerRegistry, UpscalerSpec
from webui.engine.vae import load_vae
from webui.errors import (
    InvalidRequestError,
    LatentStudioError,
    ModelLoadError,
    ModelNotFoundError,
    NoModelError,
    OutOfMemoryError,
    PluginError,
    UnknownSamplerError,
)
from webui.fields import BUILTIN_FIELDS, BUILTIN_TASKS, Field, FieldRegistry, TaskSpec
from webui.hookspecs import hookimpl
from webui.images import image_to_tensor, mask_to_tensor, tensor_to_images
from webui.limits import LimitExceeded, Limits
from webui.metadata import format_infotext, parse_infotext, read_png_parameters
from webui.output import save_png
from webui.plugins import API_VERSION, make_plugin_manager
from webui.request import GenerationRequest
from webui.styles import Style, apply_styles, check_names, load_styles

__all__ = [
    "ADE20K",
    "API_VERSION",
    "Conditioning",
    "ControlInput",
    "MemoryPlan",
    "MemorySettings",
    "OutOfMemoryError",
    "Engine",
    "GenerationControl",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequestError",
    "LatentStudioError",
    "LimitExceeded",
    "Limits",
    "LoadContext",
    "ModelBundle",
    "ModelEntry",
    "ModelLoadError",
    "ModelNotFoundError",
    "NoModelError",
    "OutputImage",
    "Palette",
    "PluginError",
    "PromptEmbeds",
    "PromptReader",
    "READER_WINDOW",
    "Reading",
    "read_prompt_states",
    "load_reader",
    "RunContext",
    "SecondPass",
    "SchedulerRegistry",
    "StepInfo",
    "UnknownSamplerError",
    "UpscalerRegistry",
    "UpscalerSpec",
    "format_infotext",
    "encode_prompts",
    "hookimpl",
    "make_plugin_manager",
    "parse_infotext",
    "read_png_parameters",
    "save_png",
    # request fields and tasks (register_fields, register_tasks)
    "BUILTIN_FIELDS",
    "BUILTIN_TASKS",
    "Field",
    "FieldRegistry",
    "TaskSpec",
    # model patches and the denoiser (patch_model, wrap_denoiser, wrap_guidance)
    "ModelPatches",
    "DenoiseStep",
    "DenoiserCall",
    "GuidanceCombine",
    # LoRAs and textual-inversion embeddings (the built-in patch_model plugins)
    "EmbeddingLibrary",
    "apply_loras",
    "lora_metadata",
    "prompt_loras",
    # the RunContext.state key of the request's textual-inversion embeddings (for text encoders)
    "EMBEDDINGS_STATE",
    # image helpers for conditioning plugins
    "image_to_tensor",
    "mask_to_tensor",
    "tensor_to_images",
    "control_image_tensor",
    "snap_to_palette",
    # for model loaders and model listing (register_models, load_model)
    "HUB_ID",
    "ModelFolders",
    "WEIGHT_SUFFIXES",
    "file_sha256",
    "find_palette",
    "load_single_file",
    "load_single_file_controlnet",
    "load_vae",
    "model_hash",
    "resolve_in_root",
    # prompt styles (styles.csv; the built-in styles plugin)
    "Style",
    "apply_styles",
    "check_names",
    "load_styles",
]
