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

``API_VERSION`` changes when something here changes incompatibly.
"""

from __future__ import annotations

from webui.engine.bundle import ModelBundle
from webui.engine.context import (
    Conditioning,
    ControlInput,
    GenerationControl,
    LoadContext,
    ModelEntry,
    OutputImage,
    RunContext,
    StepInfo,
)
from webui.engine.memory import MemoryPlan, MemorySettings
from webui.engine.pipeline import Engine, GenerationResult
from webui.engine.schedulers import SchedulerRegistry
from webui.engine.segmap import ADE20K, Palette
from webui.engine.text import PromptEmbeds, encode_prompts
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
from webui.hookspecs import hookimpl
from webui.limits import LimitExceeded, Limits
from webui.metadata import format_infotext, parse_infotext, read_png_parameters
from webui.output import save_png
from webui.plugins import make_plugin_manager
from webui.request import GenerationRequest

API_VERSION = 1

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
    "RunContext",
    "SchedulerRegistry",
    "StepInfo",
    "UnknownSamplerError",
    "format_infotext",
    "encode_prompts",
    "hookimpl",
    "make_plugin_manager",
    "parse_infotext",
    "read_png_parameters",
    "save_png",
]
