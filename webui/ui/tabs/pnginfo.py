"""PNG Info: read the generation parameters of any dropped image and send them to a tab."""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from webui.metadata import parse_infotext, read_png_parameters
from webui.ui.controls import UIContext
from webui.ui.infotext import fields_from_parameters

_USER_COMMENT = 0x9286  # EXIF UserComment: where A1111 puts the parameters of JPEG and WebP files


def read_parameters(path: str | None) -> str | None:
    """The ``parameters`` text of an image file: a PNG text chunk, or the EXIF user comment."""
    if not path:
        return None
    try:
        text = read_png_parameters(path)
        if text is not None:
            return text
        with Image.open(path) as image:
            comment = image.getexif().get_ifd(0x8769).get(_USER_COMMENT)
    except (OSError, ValueError, SyntaxError):
        return None
    if isinstance(comment, bytes):
        comment = decode_user_comment(comment)
    text = str(comment or "").strip("\x00").strip()
    return text or None


def decode_user_comment(raw: bytes) -> str:
    """An EXIF UserComment: an 8-byte charset header (``UNICODE``, ``ASCII``...) and the text."""
    header, body = raw[:8], raw[8:]
    if header.startswith(b"UNICODE"):
        # big-endian UTF-16 by the standard; some writers use little-endian (the zero byte comes second)
        little = len(body) > 1 and body[1:2] == b"\x00" and body[:1] != b"\x00"
        return body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    return body.decode("utf-8", errors="replace")


def build(ctx: UIContext) -> None:
    tabs, labels = ctx.selector, ctx.labels
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Drop an image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             height=360, elem_id="pnginfo-image")
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=6, interactive=False, buttons=["copy"],
                              elem_id="pnginfo-text")
            table = gr.JSON(label="Parsed", elem_id="pnginfo-parsed")
            with gr.Row():
                buttons = {task: gr.Button(f"Send to {labels[task]}", elem_id=f"pnginfo-send-{task}")
                           for task in ctx.tabs}

    def read(path: str | None) -> tuple[str, dict[str, Any] | None]:
        found = read_parameters(path)
        if path and found is None:
            gr.Warning("This image carries no generation parameters.")
            return "", None
        return found or "", parse_infotext(found) if found else None

    image.change(read, inputs=image, outputs=[text, table], api_name="pnginfo")

    for task, button in buttons.items():
        tab = ctx.tabs[task]
        names = [name for name in tab.fields if name in _SENDABLE]
        targets = [tab.fields[name] for name in names]

        def send(parameters: str, names: list[str] = names, task: str = task) -> list[Any]:
            if not parameters:
                raise gr.Error("Drop an image with generation parameters first.", print_exception=False)
            values = fields_from_parameters(parse_infotext(parameters), ctx.samplers)
            if "model" in values and values["model"] not in ctx.service.model_names():
                gr.Warning(f"model {values['model']!r} is not installed; keeping the current model")
                values.pop("model")
            return [gr.Tabs(selected=task)] + [values[name] if name in values else gr.skip() for name in names]

        button.click(send, inputs=text, outputs=[tabs, *targets], api_name=f"pnginfo_to_{task}")


_SENDABLE = frozenset({
    "prompt", "negative_prompt", "sampler", "steps", "cfg_scale", "seed", "width", "height", "strength",
    "mask_blur", "control_scale", "batch_size", "model",
})

