"""Built-in outpainting: extend the canvas of the init image and inpaint the new area.

Four request fields, ``outpaint_left``, ``outpaint_right``, ``outpaint_up`` and ``outpaint_down``
(pixels, 0 = not that side), on the img2img and inpainting tabs (one "Outpainting" row), with
their ``--outpaint-*`` flags and the HTTP API's keys of the same names. In ``prepare_request``
(before the masked-image plugin):

* each amount is rounded up to a multiple of 8 (the model's factor; A1111's outpainting scripts
  pad the same way), and when the image's own width or height is not one, the rest goes to the
  right or bottom edge; the new canvas is checked against the server's limits before it is built;
* the canvas is the init image at its own size (the request's width and height become the
  canvas's), the new area filled with the image's edge colours stretched outwards and blurred
  (the start for "original" and "fill"; "latent noise" and "latent nothing" replace it in latent
  space as for any inpainting);
* the mask is the new area plus ``mask_blur`` pixels into the image (the seam, softened by the
  masked-image plugin's blur of ``mask_blur``), together with the user's mask, if any (inverted
  first when "Invert mask" is on);
* after generation the image's own pixels outside the seam are pasted back, byte for byte.

Works with inpainting (9-channel) and ordinary (4-channel) models alike: it only prepares the image
and the mask the masked-image plugin conditions on. The infotext says ``Outpaint: left 64, up 32``
and PNG Info reads it back into the four fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

from webui.api import GenerationRequest, InvalidRequestError, OutputImage, RunContext, hookimpl

LATENT_STUDIO_API = 1
SIDES = ("left", "right", "up", "down")
FIELDS = tuple(f"outpaint_{side}" for side in SIDES)
TASKS = ("img2img", "inpaint")
INFOTEXT = "Outpaint"
FACTOR = 8  # the canvas's sides stay multiples of the VAE's factor
MAX_AMOUNT = 8192
STATE_KEY = "outpaint"
_ENTRY = re.compile(r"\s*(left|right|up|down)\s+(\d{1,6})\s*\Z")


@dataclass
class _Canvas:
    original: Image.Image  # the init image as it was given
    box: tuple[int, int]  # where it sits on the canvas (left, top)
    size: tuple[int, int]  # the canvas (width, height)
    mask: Image.Image  # the mask given to inpainting (before the masked-image plugin's blur)
    blur: int


def _read(side: str) -> Callable[[Mapping[str, Any]], int | None]:
    def read(parsed: Mapping[str, Any]) -> int | None:
        return parse_infotext(parsed.get(INFOTEXT)).get(side)

    return read


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    for side, name in zip(SIDES, FIELDS, strict=True):
        register(
            name,
            "int",
            default=0,
            minimum=0,
            maximum=MAX_AMOUNT,
            ui_maximum=512,
            step=FACTOR,
            limit="max_pixels",
            tasks=TASKS,
            label=f"Outpaint {side}",
            group="Outpainting",
            help=f"pixels added {'on the ' + side if side in ('left', 'right') else side} (a multiple of 8)",
            record="hook",
            read=_read(side),
        )


def amounts(request: GenerationRequest) -> dict[str, int]:
    """The request's outpainting amounts by side, as given (0 for a side not extended)."""
    return {side: int(request.extra.get(name) or 0) for side, name in zip(SIDES, FIELDS, strict=True)}


def parse_infotext(text: Any) -> dict[str, int]:
    """``"left 64, up 32"`` as ``{"left": 64, "up": 32}``; entries that are not "side N" are left out."""
    found: dict[str, int] = {}
    if not text:
        return found
    for entry in str(text)[:200].split(","):
        match = _ENTRY.match(entry)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found


def format_infotext(sides: Mapping[str, int]) -> str:
    return ", ".join(f"{side} {sides[side]}" for side in SIDES if sides.get(side))


def plan(image_size: tuple[int, int], given: Mapping[str, int]) -> dict[str, int]:
    """The amounts actually added: each rounded up to a multiple of 8, and the rest of an image side
    that is not a multiple of 8 added on the right or bottom (on the left or top when only that
    side is extended)."""
    sides = {side: -(-int(given.get(side, 0)) // FACTOR) * FACTOR for side in SIDES}
    width, height = image_size
    for near, far, length in (("left", "right", width), ("up", "down", height)):
        rest = -(length + sides[near] + sides[far]) % FACTOR
        if rest:
            sides[near if sides[near] and not sides[far] else far] += rest
    return sides


@hookimpl(tryfirst=True)  # before the masked-image plugin, which blurs and pastes the mask made here
def prepare_request(request: GenerationRequest, context: RunContext) -> None:
    given = amounts(request)
    if not any(given.values()):
        return
    if request.init_image is None:
        raise InvalidRequestError("outpainting needs an image to extend (init_image)")
    if request.task not in TASKS:
        raise InvalidRequestError(f"outpainting works in img2img and inpainting, not in {request.task}")
    image = request.init_image
    sides = plan(image.size, given)
    width = image.width + sides["left"] + sides["right"]
    height = image.height + sides["up"] + sides["down"]
    if width > MAX_AMOUNT or height > MAX_AMOUNT:
        raise InvalidRequestError(
            f"outpainting would make a {width}x{height} image; each side may be at most {MAX_AMOUNT}"
        )
    limits = getattr(context.engine, "limits", None)
    if limits is not None:  # before the canvas is built
        limits.check_request(request, width, height)
    box = (sides["left"], sides["up"])
    blur = int(request.mask_blur)
    mask = new_area_mask(image.size, sides, overlap=blur)
    if request.mask is not None:
        user = request.mask.convert("L")
        if request.invert_mask:
            user = ImageOps.invert(user)
        placed = Image.new("L", (width, height), 0)
        placed.paste(user.resize(image.size, Image.Resampling.BILINEAR), box)
        mask = ImageChops.lighter(mask, placed)
    request.init_image = extend(image, sides)
    request.mask = mask
    request.invert_mask = False
    request.width, request.height = width, height
    context.state[STATE_KEY] = _Canvas(image, box, (width, height), mask, blur)
    context.state[STATE_KEY + ":sides"] = sides


def new_area_mask(size: tuple[int, int], sides: Mapping[str, int], *, overlap: int) -> Image.Image:
    """White over the new area and ``overlap`` pixels into the image on each extended side."""
    width, height = size
    total = (width + sides["left"] + sides["right"], height + sides["up"] + sides["down"])
    mask = Image.new("L", total, 255)
    left = sides["left"] + (overlap if sides["left"] else 0)
    top = sides["up"] + (overlap if sides["up"] else 0)
    right = sides["left"] + width - (overlap if sides["right"] else 0)
    bottom = sides["up"] + height - (overlap if sides["down"] else 0)
    if right > left and bottom > top:
        mask.paste(0, (left, top, right, bottom))
    return mask


def extend(image: Image.Image, sides: Mapping[str, int]) -> Image.Image:
    """``image`` on a canvas grown by ``sides``, the new area filled with the edge colours stretched
    outwards and blurred (more the farther from the image), the image itself unchanged."""
    pixels = np.asarray(image.convert("RGB"))
    padded = np.pad(
        pixels, ((sides["up"], sides["down"]), (sides["left"], sides["right"]), (0, 0)), mode="edge"
    )
    canvas = Image.fromarray(padded)
    reach = max(sides.values())
    blurred = canvas
    for radius in (max(1, reach // 16), max(1, reach // 4)):
        blurred = blurred.filter(ImageFilter.GaussianBlur(radius))
    keep = Image.new("L", canvas.size, 0)
    keep.paste(255, (sides["left"], sides["up"], sides["left"] + image.width, sides["up"] + image.height))
    out = Image.composite(canvas, blurred, keep)
    return out


@hookimpl(trylast=True)  # after the masked-image plugin's composite
def postprocess_images(images: list[OutputImage], request: GenerationRequest, context: RunContext) -> None:
    canvas: _Canvas | None = context.state.get(STATE_KEY)
    if canvas is None:
        return
    soft = canvas.mask.filter(ImageFilter.GaussianBlur(canvas.blur)) if canvas.blur > 0 else canvas.mask
    left, top = canvas.box
    region = (left, top, left + canvas.original.width, top + canvas.original.height)
    # the image's own pixels wherever the blurred mask leaves them untouched, byte for byte
    keep = soft.crop(region).point(lambda v: 255 if v == 0 else 0)
    original = canvas.original.convert("RGB")
    for item in images:
        if item.image.size != canvas.size:
            continue
        result = item.image.convert("RGB")
        result.paste(original, (left, top), keep)
        item.image = result


@hookimpl
def write_metadata(
    parameters: dict[str, Any], image: OutputImage, request: GenerationRequest, context: RunContext
) -> None:
    sides = context.state.get(STATE_KEY + ":sides")
    if sides:
        parameters[INFOTEXT] = format_infotext(sides)
