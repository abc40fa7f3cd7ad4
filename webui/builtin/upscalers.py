"""Built-in image upscalers and the Extras tab.

Lanczos and Nearest need no file. Every model file in the upscaler folders of each models root
(``upscalers/``, A1111's ``ESRGAN/``, ``RealESRGAN/``, ``SwinIR/``, ``DAT/``, ComfyUI's
``upscale_models/``) is offered under its file name without the extension; ``engine.upscalers``
loads it with spandrel when it is first used. The Extras tab (``webui/ui/tabs/extras.py``) upscales
one image or a batch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from webui.api import ModelFolders, hookimpl

LATENT_STUDIO_API = 1


def lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.Resampling.LANCZOS)


def nearest(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.Resampling.NEAREST)


@hookimpl(trylast=True)
def register_upscalers(register: Callable[..., None], models_dirs: list[str]) -> None:
    register("Lanczos", resample=lanczos)
    register("Nearest", resample=nearest)
    for entry in ModelFolders.of(*models_dirs).scan("upscaler"):
        path = Path(entry.source)
        register(path.name[: -len(path.suffix)] if path.suffix else path.name, path=path)


@hookimpl(trylast=True)
def register_ui_tabs(register: Callable[..., None]) -> None:
    def build(ui: Any) -> Any:
        return importlib.import_module("webui.ui.tabs.extras").build(ui)

    register("extras", "Extras", build, order=80)
