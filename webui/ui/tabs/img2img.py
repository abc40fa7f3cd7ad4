"""Image to image: an init image and the denoising strength."""

from __future__ import annotations

from typing import Any

import gradio as gr

from webui.errors import InvalidRequestError
from webui.ui.controls import GenerationTab, UIContext, generation_tab


def build(ctx: UIContext) -> GenerationTab:
    def controls() -> dict[str, Any]:
        return {
            # a file path: the engine opens it itself (pixel cap, EXIF rotation, RGBA, 16-bit)
            "init_image": gr.Image(label="Init image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                   height=300, elem_id="img2img-init"),
            "strength": gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength"),
        }

    def extras(values: dict[str, Any]) -> dict[str, Any]:
        if not values.get("init_image"):
            raise InvalidRequestError("upload an init image first")
        return {"init_image": values["init_image"], "strength": float(values["strength"])}

    return generation_tab(ctx, "img2img", extras=extras, build_controls=controls)
