"""PNG Info: read the generation parameters of any dropped image and send them to a tab."""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from webui.fields import FieldRegistry
from webui.limits import Limits
from webui.metadata import parse_infotext, read_png_parameters
from webui.ui.controls import GenerationTab, UIContext, choices_of
from webui.ui.infotext import Range, clamp_fields, fields_from_infotext
from webui.ui.security import guard_image_input

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


def too_long(text: str, limits: Limits) -> str | None:
    """Why a parameters text is refused before it is parsed, or ``None`` when it may be parsed."""
    limit = limits.max_infotext_chars
    if limit and len(text) > limit:
        return (
            f"the parameters text has {len(text)} characters; the limit is {limit} (--max-infotext-chars), "
            "so it is not read"
        )
    return None


def control_ranges(fields: dict[str, Any], limits: Limits) -> dict[str, Range]:
    """What each control of a tab accepts, read from the control itself: a slider's ends and step
    (its top already lowered to the server's limit), a number box's bounds, a text box's length."""
    ranges: dict[str, Range] = {}
    for name, component in fields.items():
        label = str(component.label or name).split(" (")[0]  # "Seed (-1 = random)" -> "Seed"
        if isinstance(component, gr.Slider):
            ranges[name] = Range(label, component.minimum, component.maximum, component.step)
        elif isinstance(component, gr.Number):
            ranges[name] = Range(label, component.minimum, component.maximum, component.step)
        elif isinstance(component, gr.Textbox):
            ranges[name] = Range(label, max_chars=component.max_length or limits.max_prompt_chars or None)
    return ranges


def send_targets(tab: GenerationTab, registry: FieldRegistry) -> list[str]:
    """The fields of ``tab`` that PNG Info fills: those with a control there whose declaration has
    an infotext key (or a ``read``) and ``send=True``."""
    names = []
    for name in tab.fields:
        declared = registry.get(name)
        if (
            declared is not None
            and declared.send
            and (declared.infotext or declared.read)
            and declared.applies_to(tab.task)
        ):
            names.append(name)
    return names


def build(ctx: UIContext) -> None:
    limits: Limits = ctx.limits
    registry = ctx.fields
    with gr.Row(equal_height=False):
        with gr.Column():
            image = guard_image_input(
                gr.Image(
                    label="Drop an image",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    height=360,
                    elem_id="pnginfo-image",
                ),
                "image",
            )
        with gr.Column():
            text = gr.Textbox(
                label="Parameters", lines=6, interactive=False, buttons=["copy"], elem_id="pnginfo-text"
            )
            table = gr.JSON(label="Parsed", elem_id="pnginfo-parsed")
            notes = gr.Markdown("", elem_id="pnginfo-notes")
            buttons_row = gr.Row()

    def read(path: str | None) -> tuple[str, dict[str, Any] | None, str]:
        """The parameters text, parsed, and a note (why nothing was read, or "")."""
        found = read_parameters(path)
        if path and found is None:
            gr.Warning("This image carries no generation parameters.")
            return "", None, ""
        if found is None:
            return "", None, ""
        refused = too_long(found, limits)
        if refused:  # refused before parsing: a huge text must not hold the server
            gr.Warning(refused)
            return "", None, refused
        return found, parse_infotext(found), ""

    image.change(read, inputs=image, outputs=[text, table, notes], api_name="pnginfo")

    def connect(tab: GenerationTab) -> None:
        """A "Send to" button for ``tab``: the infotext's values of the fields it shows, each read
        through its declaration, brought into its control's range, names not on offer left out."""
        button = gr.Button(f"Send to {ctx.labels.get(tab.id, tab.id)}", elem_id=f"pnginfo-send-{tab.id}")
        names = send_targets(tab, registry)
        targets = [tab.fields[name] for name in names]
        ranges = control_ranges({name: tab.fields[name] for name in names}, limits)
        listed = [name for name in names if registry[name].source is not None]

        def send(parameters: str) -> list[Any]:
            if not parameters:
                raise gr.Error("Drop an image with generation parameters first.", print_exception=False)
            refused = too_long(parameters, limits)
            if refused:
                raise gr.Error(refused, print_exception=False)
            parsed = parse_infotext(parameters)
            offered = {name: choices_of(ctx, registry[name]) for name in listed}
            values, unread = fields_from_infotext(
                registry, parsed, task=tab.task, names=names, offered=offered
            )
            values, changes = clamp_fields(values, ranges)
            note = "; ".join(unread + changes)
            if note:
                gr.Warning(note)
            return [gr.Tabs(selected=tab.id), note] + [
                values[name] if name in values else gr.skip() for name in names
            ]

        button.click(
            send, inputs=text, outputs=[ctx.selector, notes, *targets], api_name=f"pnginfo_to_{tab.id}"
        )

    def connect_every_tab() -> None:
        """Once every tab is built, so tabs registered after PNG Info get their button too."""
        with buttons_row:
            for tab in ctx.tabs.values():
                connect(tab)

    ctx.when_built(connect_every_tab)
