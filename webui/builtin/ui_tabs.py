"""Built-in web UI tabs, contributed through the same hook a community plugin uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from webui.api import hookimpl

LATENT_STUDIO_API = 1


@hookimpl(trylast=True)
def register_ui_tabs(register: Callable[..., None]) -> None:
    def lazy(module: str) -> Callable[[Any], Any]:
        def build(ui: Any) -> Any:
            import importlib

            return importlib.import_module(f"webui.ui.tabs.{module}").build(ui)

        return build

    register("txt2img", "Text to image", lazy("txt2img"), order=10)
    register("img2img", "Image to image", lazy("img2img"), order=20)
    register("inpaint", "Inpainting", lazy("inpaint"), order=30)
    register("seg2img", "Segmentation to image", lazy("segmap"), order=40)
    register("pnginfo", "PNG Info", lazy("pnginfo"), order=90)
    register("plugins", "Plugins", lazy("plugins"), order=1000)
