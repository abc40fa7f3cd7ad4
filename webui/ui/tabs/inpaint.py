"""Inpainting: paint the mask over the image with a brush, or upload a mask."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from webui.errors import InvalidRequestError
from webui.request import MASKED_CONTENT
from webui.ui.controls import GenerationTab, UIContext, generation_tab
from webui.ui.security import guard_image_input, open_upload


def build(ctx: UIContext) -> GenerationTab:
    brush_size = max(2, ctx.default_size // 16)  # in image pixels: 4 on the 64-pixel default model, 32 at 512

    def controls() -> dict[str, Any]:
        fields: dict[str, Any] = {}
        fields["editor"] = guard_image_input(gr.ImageEditor(
            label="Image and mask: upload, then paint over what should change", type="pil", image_mode="RGBA",
            sources=["upload", "clipboard"], brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=brush_size),
            eraser=gr.Eraser(), transforms=(), layers=False, height=360, elem_id="inpaint-editor",
        ), "image")
        with gr.Accordion("Upload a mask instead (white = repaint)", open=False):
            fields["mask_upload"] = guard_image_input(gr.Image(
                label="Mask", type="filepath", image_mode=None, sources=["upload"], height=200,
                elem_id="inpaint-mask"), "mask")
        with gr.Row():
            fields["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur")
            fields["strength"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Denoising strength")
        with gr.Row():
            fields["masked_content"] = gr.Radio(list(MASKED_CONTENT), value="original", label="Masked content")
            fields["invert_mask"] = gr.Checkbox(False, label="Invert mask")
        with gr.Row():
            fields["only_masked"] = gr.Checkbox(False, label="Only masked (inpaint at full resolution)")
            fields["only_masked_padding"] = gr.Slider(0, 256, value=32, step=4, label="Only masked padding")
        return fields

    def extras(values: dict[str, Any]) -> dict[str, Any]:
        image, painted = editor_image_and_mask(values.get("editor"))
        if image is None:
            raise InvalidRequestError("upload an image to inpaint first")
        mask = open_upload(values["mask_upload"], "mask") if values.get("mask_upload") else painted
        if mask is None:
            raise InvalidRequestError("paint a mask over the image (or upload one): nothing is marked to change")
        return {
            "init_image": image, "mask": mask, "mask_blur": int(values["mask_blur"]),
            "strength": float(values["strength"]), "masked_content": values["masked_content"],
            "invert_mask": bool(values["invert_mask"]), "only_masked": bool(values["only_masked"]),
            "only_masked_padding": int(values["only_masked_padding"]),
        }

    return generation_tab(ctx, "inpaint", extras=extras, build_controls=controls)


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
