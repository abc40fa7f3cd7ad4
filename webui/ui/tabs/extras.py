"""Extras: upscale one image or a batch with any upscaler, as A1111's Extras tab.

The images are saved to ``outputs/extras/<date>/`` with the source's ``parameters`` kept and the
upscale noted (``postprocessing``). The work waits for the device's turn, so it queues with the
generations; an error is one line.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from PIL import Image

from webui.errors import InvalidRequestError, LatentStudioError
from webui.postprocess import NONE, save_extras, upscale_image
from webui.ui.controls import BUSY_CONCURRENCY_ID, UIContext
from webui.ui.security import check_upload_file, guard_image_input
from webui.ui.tabs.pnginfo import read_parameters

log = logging.getLogger(__name__)

SCALE_BY, SCALE_TO = "Scale by", "Scale to"
SINGLE, BATCH = "Single image", "Batch"
MAX_BATCH_FILES = 64


def open_image(path: str, subject: str) -> Image.Image:
    """An uploaded image, checked from its header before it is decoded."""
    check_upload_file(path, subject)
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InvalidRequestError(f"{subject} is not a readable image") from None


def build(ctx: UIContext) -> None:
    service = ctx.service

    def names() -> list[str]:
        try:
            return list(service.upscaler_names())
        except LatentStudioError as error:
            log.warning("cannot list the upscalers: %s", error)
            return []

    choices = names()
    with gr.Row(equal_height=False):
        with gr.Column():
            source = gr.Radio(
                [SINGLE, BATCH], value=SINGLE, label="Source", show_label=False, elem_id="extras-source"
            )
            image = guard_image_input(
                gr.Image(
                    label="Source",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    height=320,
                    elem_id="extras-image",
                ),
                "image",
            )
            files = gr.File(
                label="Images",
                file_count="multiple",
                file_types=["image"],
                visible=False,
                elem_id="extras-batch",
            )
            mode = gr.Radio(
                [SCALE_BY, SCALE_TO], value=SCALE_BY, label="Resize", elem_id="extras-resize-mode"
            )
            scale = gr.Slider(1, 8, value=2, step=0.05, label="Scale by", elem_id="extras-scale")
            with gr.Row():
                width = gr.Number(512, label="Width", precision=0, minimum=1, elem_id="extras-width")
                height = gr.Number(512, label="Height", precision=0, minimum=1, elem_id="extras-height")
                crop = gr.Checkbox(True, label="Crop to fit", elem_id="extras-crop")
            with gr.Row():
                upscaler = gr.Dropdown(
                    choices,
                    value=choices[0] if choices else None,
                    label="Upscaler 1",
                    elem_id="extras-upscaler",
                    scale=4,
                )
                refresh = gr.Button("↻", elem_id="extras-refresh", scale=0, min_width=40)
            with gr.Row():
                upscaler_2 = gr.Dropdown(
                    [NONE, *choices], value=NONE, label="Upscaler 2", elem_id="extras-upscaler-2", scale=4
                )
                visibility = gr.Slider(
                    0, 1, value=0, step=0.05, label="Upscaler 2 visibility", elem_id="extras-visibility"
                )
            run = gr.Button("Upscale", variant="primary", elem_id="extras-run")
        with gr.Column():
            gallery = gr.Gallery(label="Output", columns=2, height=420, elem_id="extras-gallery")
            info = gr.Textbox(label="Info", lines=2, interactive=False, elem_id="extras-info")

    source.change(
        lambda where: (gr.Image(visible=where == SINGLE), gr.File(visible=where == BATCH)),
        inputs=source,
        outputs=[image, files],
        queue=False,
    )

    def refreshed() -> tuple[Any, Any]:
        found = names()
        return gr.Dropdown(choices=found), gr.Dropdown(choices=[NONE, *found])

    refresh.click(refreshed, outputs=[upscaler, upscaler_2], queue=False)

    def upscale(
        where: str,
        image_path: str | None,
        batch: list[Any] | None,
        resize: str,
        factor: float,
        w: float | None,
        h: float | None,
        cut: bool,
        first: str | None,
        second: str | None,
        weight: float,
    ) -> tuple[list[tuple[Any, str]], str]:
        try:
            given = [image_path] if where != BATCH else [_path_of(item) for item in batch or []]
            paths = [p for p in given if p]
            if not paths:
                raise InvalidRequestError(
                    "drop an image first" if where != BATCH else "add images to the batch first"
                )
            limit = min(MAX_BATCH_FILES, ctx.limits.max_batch or MAX_BATCH_FILES)
            if len(paths) > limit:
                raise InvalidRequestError(f"{len(paths)} images were given; at most {limit} at once")
            if not first:
                raise InvalidRequestError("choose an upscaler")
            size = None
            if resize == SCALE_TO:
                if not w or not h:
                    raise InvalidRequestError("give the width and the height to scale to")
                size = (int(w), int(h))
            sources = [
                (open_image(path, f"image {n + 1}" if len(paths) > 1 else "image"), read_parameters(path))
                for n, path in enumerate(paths)
            ]
            shown: list[tuple[Any, str]] = []
            notes: list[str] = []
            with service.device_turn():
                for picture, parameters in sources:
                    result = upscale_image(
                        service.engine,
                        picture,
                        first,
                        scale=float(factor) if size is None else None,
                        size=size,
                        crop=bool(cut),
                        upscaler_2=second,
                        visibility=float(weight or 0),
                        parameters=parameters,
                    )
                    caption = f"{result.image.width}x{result.image.height}"
                    try:
                        shown.append((str(save_extras(result, service.outputs_dir)), caption))
                    except OSError as error:
                        gr.Warning(f"the image could not be saved: {error.strerror or error}")
                        shown.append((result.image, caption))
                    notes.append(result.note)
        except LatentStudioError as error:
            raise gr.Error(str(error), print_exception=False) from None
        return shown, "\n".join(dict.fromkeys(n for n in notes if n))

    run.click(
        upscale,
        inputs=[source, image, files, mode, scale, width, height, crop, upscaler, upscaler_2, visibility],
        outputs=[gallery, info],
        api_name="extras",
        concurrency_id=BUSY_CONCURRENCY_ID,
        concurrency_limit=ctx.service.concurrency,
    )


def _path_of(item: Any) -> str | None:
    """A gr.File value: a path, or an object with ``.name`` / ``["path"]`` (gradio versions differ)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return item.get("path") or item.get("name")
    return getattr(item, "path", None) or getattr(item, "name", None)
