"""Extras: upscale finished images, as AUTOMATIC1111's Extras tab does, for the web app, the command
line and the HTTP API alike. No torch here: the engine's upscalers do the work (``engine.upscalers``).

Two ways to size the result, as A1111: ``scale`` (times the image's size), or ``size`` (the image is
scaled by the larger of the two ratios, so that it covers the size, keeping its aspect; with
``crop`` the centre is then cut to exactly that size). A second upscaler may be blended in
(``upscaler_2`` at ``visibility`` 0..1). The source's ``parameters`` text is kept; what was done is
noted in the ``postprocessing`` text (``Postprocess upscale by: 2, Postprocess upscaler: Lanczos``),
which A1111 writes too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from webui.engine import torch_thread  # no torch imported: the thread that runs it
from webui.errors import InvalidRequestError
from webui.images import scaled_size
from webui.metadata import format_value
from webui.output import output_dir, save_png

__all__ = ["EXTRAS_TASK", "POSTPROCESSING_KEY", "ExtrasResult", "NONE", "save_extras", "upscale_image"]

EXTRAS_TASK = "extras"  # the outputs sub-folder
POSTPROCESSING_KEY = "postprocessing"  # the PNG text chunk A1111 writes the extras' note to
NONE = "None"  # A1111's name for "no upscaler"
_SEED = re.compile(r"(?:^|,\s*)Seed:\s*(\d+)")


@dataclass
class ExtrasResult:
    """An upscaled image, the source's ``parameters`` (or None) and the note of what was done."""

    image: Image.Image
    parameters: str | None = None
    info: dict[str, str] = field(default_factory=dict)

    @property
    def note(self) -> str:
        """The ``postprocessing`` text: ``Key: value`` pairs joined by ``", "``."""
        return ", ".join(f"{key}: {value}" for key, value in self.info.items())


def upscale_image(
    engine: Any,
    image: Image.Image,
    upscaler: str,
    *,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    crop: bool = False,
    upscaler_2: str | None = None,
    visibility: float = 0.0,
    parameters: str | None = None,
) -> ExtrasResult:
    """``image`` upscaled as the Extras tab does. ``upscaler`` ``"None"``: the image as it is
    (after ``crop``, when a size is given). Errors: one-line :class:`~webui.errors.LatentStudioError`."""
    if (scale is None) == (size is None):
        raise InvalidRequestError("give either a scale or a target size for the upscale, not both or neither")
    if isinstance(visibility, bool) or not isinstance(visibility, (int, float)) or not 0 <= visibility <= 1:
        raise InvalidRequestError(
            f"the second upscaler's visibility must be between 0 and 1, got {visibility!r}"
        )
    width, height = image.size
    info: dict[str, str] = {}
    if scale is not None:
        target = scaled_size(width, height, scale)
        info["Postprocess upscale by"] = format_value(scale)
    else:
        assert size is not None
        want_w, want_h = _size(size)
        factor = max(want_w / width, want_h / height)  # covers the size, the aspect kept
        target = (max(1, round(width * factor)), max(1, round(height * factor)))
        if crop:
            target = (max(want_w, target[0]), max(want_h, target[1]))
        info["Postprocess upscale to"] = f"{want_w}x{want_h}"
        if crop:
            info["Postprocess crop to"] = f"{want_w}x{want_h}"
    upscalers = engine.upscalers
    first = upscaler if upscaler and upscaler != NONE else None
    second = upscaler_2 if upscaler_2 and upscaler_2 != NONE and visibility > 0 else None
    if first is None and second is not None:
        first, second, visibility = second, None, 0.0
    if first is None:
        result = image.convert("RGB")
        if size is not None:
            result = result.resize(target, Image.Resampling.LANCZOS)
    else:
        info["Postprocess upscaler"] = first
        result = torch_thread.call(upscalers.upscale, image, first, size=target)
        if second is not None:
            info["Postprocess upscaler 2"] = second
            info["Postprocess upscaler 2 visibility"] = format_value(round(float(visibility), 3))
            other = torch_thread.call(upscalers.upscale, image, second, size=target)
            result = Image.blend(result, other, float(visibility))
    if size is not None and crop:
        want_w, want_h = _size(size)
        left, top = (result.width - want_w) // 2, (result.height - want_h) // 2
        result = result.crop((left, top, left + want_w, top + want_h))
    if first is None:
        info = {}
    return ExtrasResult(image=result, parameters=parameters, info=info)


def _size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"the target size must be two whole numbers, got {size!r}") from None
    if w <= 0 or h <= 0:
        raise InvalidRequestError(f"the target size must be above 0 on both sides, got {w}x{h}")
    return w, h


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` as (1024, 768); anything else: :class:`InvalidRequestError`."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*", str(text))
    if match is None:
        raise InvalidRequestError(f"a size is WIDTHxHEIGHT, e.g. 1024x768; got {text!r}")
    return _size((int(match.group(1)), int(match.group(2))))


def seed_of(parameters: str | None) -> int:
    """The ``Seed`` of a ``parameters`` text (for the file name), else 0."""
    if not parameters:
        return 0
    last = parameters.strip().splitlines()[-1]
    match = _SEED.search(last)
    return int(match.group(1)) if match else 0


def save_extras(result: ExtrasResult, outputs_dir: str | Path) -> Path:
    """Save ``result`` under ``outputs_dir/extras/<date>/`` with the source's ``parameters`` kept
    and the ``postprocessing`` note beside it."""
    return save_png(
        result.image,
        output_dir(outputs_dir, EXTRAS_TASK),
        seed=seed_of(result.parameters),
        infotext=result.parameters,
        extra={POSTPROCESSING_KEY: result.note} if result.info else None,
    )
