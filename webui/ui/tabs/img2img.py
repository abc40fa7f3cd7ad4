"""Image to image: an init image and the denoising strength."""

from __future__ import annotations

from typing import Any

import gradio as gr

from webui.errors import InvalidRequestError
from webui.ui.controls import GenerationTab, UIContext, generation_tab
from webui.ui.security import guard_image_input, open_upload


def build(ctx: UIContext) -> GenerationTab:
    def controls() -> dict[str, Any]:
        return {
            # a file path, checked from its header (bombs, non-images) and opened by open_upload;
            # the engine does the rest (EXIF rotation, RGBA, 16-bit)
            "init_image": guard_image_input(gr.Image(
                label="Init image", type="filepath", image_mode=None, sources=["upload", "clipboard"], height=300,
                elem_id="img2img-init"), "init image"),
            "strength": gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength"),
        }

    def extras(values: dict[str, Any]) -> dict[str, Any]:
        if not values.get("init_image"):
            raise InvalidRequestError("upload an init image first")
        return {"init_image": open_upload(values["init_image"], "init image"), "strength": float(values["strength"])}

    return generation_tab(ctx, "img2img", extras=extras, build_controls=controls)
