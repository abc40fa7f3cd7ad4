"""Segmentation map to image: paint a label map with the model's class palette, or upload one."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
from PIL import Image

from webui.engine.segmap import Palette
from webui.errors import InvalidRequestError
from webui.ui.controls import GenerationTab, UIContext, generation_tab, make_control
from webui.ui.security import guard_image_input, open_upload


def hex_color(rgb: Any) -> str:
    r, g, b = (int(v) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def legend_html(palette: Palette, limit: int = 200) -> str:
    """Swatches with class names: what each brush colour means."""
    items = []
    for name, rgb in list(zip(palette.classes, palette.colors, strict=True))[:limit]:
        items.append(
            f'<span class="ls-swatch" title="{html.escape(name)}" style="display:inline-flex;align-items:center;'
            f'margin:2px 8px 2px 0"><span style="display:inline-block;width:14px;height:14px;border:1px solid #888;'
            f'background:{hex_color(rgb)};margin-right:4px"></span>{html.escape(name)}</span>'
        )
    return f'<div class="ls-legend" data-palette="{html.escape(palette.name)}">{"".join(items)}</div>'


def blank_map(palette: Palette, size: int) -> Image.Image:
    """A canvas filled with the first class (the background class of most palettes)."""
    return Image.new("RGB", (size, size), tuple(int(v) for v in palette.colors[0]))


def _brush(palette: Palette, size: int) -> gr.Brush:
    colors = [hex_color(rgb) for rgb in palette.colors]
    default = colors[1] if len(colors) > 1 else colors[0]
    return gr.Brush(colors=colors, default_color=default, color_mode="fixed", default_size=max(2, size // 16))


def build(ctx: UIContext) -> GenerationTab:
    """The map comes from the palette editor (or an upload); the optional init image sits in a
    closed accordion; the ControlNet row and every other field are derived from their declarations."""
    tab_id = ctx.current_tab or "seg2img"
    info = ctx.service.model_info(ctx.default_model)
    registry = ctx.fields
    model_own = registry["controlnet"].none_label  # the ControlNet shipped in the model's folder
    shown: dict[str, Any] = {}  # components that are not request inputs

    def controls() -> dict[str, Any]:
        widgets: dict[str, Any] = {}
        widgets["seg_editor"] = guard_image_input(
            gr.ImageEditor(
                value={
                    "background": blank_map(info.palette, info.default_size),
                    "layers": [],
                    "composite": None,
                },
                label="Segmentation map: paint classes with the palette's colours",
                type="pil",
                image_mode="RGB",
                sources=["upload", "clipboard"],
                brush=_brush(info.palette, info.default_size),
                eraser=False,
                transforms=(),
                layers=False,
                height=360,
                elem_id=f"{tab_id}-editor",
            ),
            "segmentation map",
        )
        shown["legend"] = gr.HTML(legend_html(info.palette), elem_id=f"{tab_id}-legend")
        with gr.Accordion("Upload a map instead", open=False):
            widgets["seg_upload"] = guard_image_input(
                gr.Image(
                    label="Segmentation map",
                    type="filepath",
                    image_mode=None,
                    sources=["upload"],
                    height=200,
                    elem_id=f"{tab_id}-map",
                ),
                "segmentation map",
            )
        with gr.Accordion("Start from an image (optional)", open=False):
            for name in ("init_image", "strength"):
                widgets[name] = make_control(
                    ctx,
                    registry[name],
                    tab_id,
                    task="seg2img",
                    **({"height": 200} if name == "init_image" else {}),
                )
        return widgets

    def extras(values: dict[str, Any]) -> dict[str, Any]:
        seg_map = open_upload(values["seg_upload"], "segmentation map") if values.get("seg_upload") else None
        if seg_map is None:
            editor = values.get("seg_editor")
            if isinstance(editor, dict):
                seg_map = editor.get("composite") or editor.get("background")
        if seg_map is None:
            raise InvalidRequestError("paint or upload a segmentation map first")
        return {"seg_map": seg_map}

    tab = generation_tab(ctx, "seg2img", extras, controls, own=("seg_map",))

    def follow(name: str | None, controlnet: str | None) -> tuple[Any, Any]:
        """Another model or ControlNet with another palette brings its brush colours, legend and a
        blank canvas (the chosen ControlNet's palette wins over the model's own)."""
        model = ctx.service.model_info(name)
        palette = model.palette
        if controlnet not in (None, "", model_own):
            palette = ctx.service.controlnet_palette(controlnet) or palette
        canvas = {"background": blank_map(palette, model.default_size), "layers": [], "composite": None}
        return gr.update(value=canvas, brush=_brush(palette, model.default_size)), legend_html(palette)

    if "model" in tab.fields and "controlnet" in tab.fields:
        for trigger in (tab.fields["model"], tab.fields["controlnet"]):
            trigger.change(
                follow,
                inputs=[tab.fields["model"], tab.fields["controlnet"]],
                outputs=[tab.fields["seg_editor"], shown["legend"]],
                queue=False,
                api_visibility="private",
            )
    return tab
