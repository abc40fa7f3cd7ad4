"""Inpainting: paint the mask over the image with a brush, or upload a mask."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from webui.errors import InvalidRequestError
from webui.ui.controls import GenerationTab, UIContext, generation_tab
from webui.ui.security import guard_image_input, open_upload


def build(ctx: UIContext) -> GenerationTab:
    """The image and its mask come from the editor (or a mask upload); every other field of the
    task (blur, strength, masked content, only masked...) is derived from its declaration."""
    tab_id = ctx.current_tab or "inpaint"
    brush_size = max(2, ctx.default_size // 16)  # in image pixels: 4 on the 64-pixel default model, 32 at 512

    def controls() -> dict[str, Any]:
        widgets: dict[str, Any] = {}
        widgets["editor"] = guard_image_input(
            gr.ImageEditor(
                label="Image and mask: upload, then paint over what should change",
                type="pil",
                image_mode="RGBA",
                sources=["upload", "clipboard"],
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=brush_size),
                eraser=gr.Eraser(),
                transforms=(),
                layers=False,
                height=360,
                elem_id=f"{tab_id}-editor",
            ),
            "image",
        )
        with gr.Accordion("Upload a mask instead (white = repaint)", open=False):
            widgets["mask_upload"] = guard_image_input(
                gr.Image(
                    label="Mask",
                    type="filepath",
                    image_mode=None,
                    sources=["upload"],
                    height=200,
                    elem_id=f"{tab_id}-mask",
                ),
                "mask",
            )
        return widgets

    def extras(values: dict[str, Any]) -> dict[str, Any]:
        image, painted = editor_image_and_mask(values.get("editor"))
        if image is None:
            raise InvalidRequestError("upload an image to inpaint first")
        mask = open_upload(values["mask_upload"], "mask") if values.get("mask_upload") else painted
        if mask is None and any(values.get(f"outpaint_{side}") for side in ("left", "right", "up", "down")):
            mask = Image.new("L", image.size, 0)  # outpainting alone: the new area is the mask
        if mask is None:
            raise InvalidRequestError(
                "paint a mask over the image (or upload one): nothing is marked to change"
            )
        return {"init_image": image, "mask": mask}

    return generation_tab(ctx, "inpaint", extras, controls, own=("init_image", "mask"))


def editor_image_and_mask(value: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """The background image of an ImageEditor value, and the painted strokes as a mask (white where
    any layer has paint); the mask is ``None`` when nothing was painted."""
    if not isinstance(value, dict) or value.get("background") is None:
        return None, None
    background = value["background"]
    alpha = np.zeros((background.height, background.width), dtype=np.uint8)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer_alpha = np.asarray(layer.convert("RGBA").resize(background.size))[..., 3]
        alpha = np.maximum(alpha, layer_alpha)
    mask = Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8), "L") if alpha.any() else None
    return background, mask
