"""AUTOMATIC1111's Extras routes: ``/sdapi/v1/upscalers``, ``/sdapi/v1/extra-single-image`` and
``/sdapi/v1/extra-batch-images``, read and answered in A1111's shapes.

Keys: ``resize_mode`` (0: ``upscaling_resize`` times the size; 1: to ``upscaling_resize_w`` x
``upscaling_resize_h``, cut to it with ``upscaling_crop``), ``upscaler_1``, ``upscaler_2`` with
``extras_upscaler_2_visibility`` (blended in), ``show_extras_results`` and ``upscale_first``
(accepted). Face restoration (``gfpgan_visibility``, ``codeformer_visibility`` above 0) is refused
with 422, like any key A1111 does not have. The answer is ``image`` (or ``images``) as base64 PNG,
with the source's ``parameters`` kept, and ``html_info``, the note of what was done.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping
from typing import Any

from webui.errors import InvalidRequestError
from webui.http.a1111 import decode_image, encode_png, split_hash
from webui.metadata import read_png_parameters
from webui.postprocess import NONE, ExtrasResult, upscale_image

__all__ = ["extra_batch_images", "extra_single_image", "upscaler_list"]

MAX_BATCH_IMAGES = 64  # images in one extra-batch-images call (and the server's --max-batch, if lower)
_KEYS = {
    "resize_mode",
    "show_extras_results",
    "gfpgan_visibility",
    "codeformer_visibility",
    "codeformer_weight",
    "upscaling_resize",
    "upscaling_resize_w",
    "upscaling_resize_h",
    "upscaling_crop",
    "upscaler_1",
    "upscaler_2",
    "extras_upscaler_2_visibility",
    "upscale_first",
}
_REFUSED_ON = {
    "gfpgan_visibility": "face restoration (GFPGAN)",
    "codeformer_visibility": "face restoration (CodeFormer)",
}
_SCALE_IN_NAME = re.compile(r"(?:^|[^0-9])([1-8])[xX](?:[^0-9]|$)|[xX]([1-8])(?:[^0-9]|$)")


def upscaler_list(engine: Any) -> list[dict[str, Any]]:
    """A1111's upscaler list: ``None`` first, then every upscaler (no server paths)."""
    items: list[dict[str, Any]] = [
        {"name": NONE, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    ]
    for spec in engine.upscalers.specs():
        scale = spec.scale
        if scale is None and spec.path is not None:
            match = _SCALE_IN_NAME.search(spec.name)
            scale = int(match.group(1) or match.group(2)) if match else None
        items.append(
            {
                "name": spec.name,
                "model_name": spec.name if spec.path is not None else None,
                "model_path": spec.path.name if spec.path is not None else None,
                "model_url": None,
                "scale": scale if scale is not None else 4,
            }
        )
    return items


def extra_single_image(body: Any, service: Any) -> dict[str, Any]:
    options = _options(body, ("image",))
    image = decode_image(body.get("image"), "image")
    with service.device_turn():
        result = _run(service.engine, image, options)
    return {"html_info": _html(result), "image": encode_png(result.image, result.parameters)}


def extra_batch_images(body: Any, service: Any) -> dict[str, Any]:
    options = _options(body, ("imageList",))
    items = body.get("imageList")
    if not isinstance(items, list) or not items:
        raise InvalidRequestError('imageList must be a list of {"data": base64 image, "name": ...} objects')
    limit = min(MAX_BATCH_IMAGES, service.engine.limits.max_batch or MAX_BATCH_IMAGES)
    if len(items) > limit:
        raise InvalidRequestError(f"imageList has {len(items)} images; at most {limit} per call")
    images = []
    for number, item in enumerate(items):
        data = item.get("data") if isinstance(item, Mapping) else item
        images.append(decode_image(data, f"imageList[{number}]"))  # every image checked before any work
    with service.device_turn():
        results = [_run(service.engine, image, options) for image in images]
    return {
        "html_info": _html(results[0]) if results else "",
        "images": [encode_png(result.image, result.parameters) for result in results],
    }


def _options(body: Any, image_keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidRequestError("the request body must be a JSON object")
    unknown = sorted(key for key in body if key not in _KEYS and key not in image_keys)
    if unknown:
        raise InvalidRequestError(
            f"unknown key {unknown[0]!r} (this route takes {', '.join(sorted(_KEYS | set(image_keys)))})"
        )
    for key, what in _REFUSED_ON.items():
        if _number(body, key, 0.0) > 0:
            raise InvalidRequestError(f"{key}: {what} is not supported by this server; send 0")
    mode = body.get("resize_mode", 0)
    if mode not in (0, 1):
        raise InvalidRequestError(f"resize_mode must be 0 (scale by) or 1 (scale to), got {mode!r}")
    options: dict[str, Any] = {
        "upscaler": _name(body.get("upscaler_1", NONE), "upscaler_1"),
        "upscaler_2": _name(body.get("upscaler_2", NONE), "upscaler_2"),
        "visibility": _number(body, "extras_upscaler_2_visibility", 0.0),
        "crop": _flag(body.get("upscaling_crop", True), "upscaling_crop"),
    }
    if mode == 0:
        options["scale"] = _number(body, "upscaling_resize", 2.0)
    else:
        width = _number(body, "upscaling_resize_w", 512)
        height = _number(body, "upscaling_resize_h", 512)
        if not (float(width).is_integer() and float(height).is_integer()):
            raise InvalidRequestError("upscaling_resize_w and upscaling_resize_h must be whole numbers")
        options["size"] = (int(width), int(height))
    return options


def _run(engine: Any, image: Any, options: dict[str, Any]) -> ExtrasResult:
    parameters = read_png_parameters(image)
    return upscale_image(
        engine,
        image,
        options["upscaler"],
        scale=options.get("scale"),
        size=options.get("size"),
        crop=options["crop"] if "size" in options else False,
        upscaler_2=options["upscaler_2"],
        visibility=options["visibility"],
        parameters=parameters,
    )


def _html(result: ExtrasResult) -> str:
    return f"<p>{html.escape(result.note)}</p>" if result.note else ""


def _name(value: Any, key: str) -> str:
    if value is None:
        return NONE
    if not isinstance(value, str):
        raise InvalidRequestError(f"{key} must be an upscaler name, got {type(value).__name__}")
    return split_hash(value)


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{key} must be a number, got {value!r}")
    return float(value)


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise InvalidRequestError(f"{key} must be true or false, got {value!r}")
