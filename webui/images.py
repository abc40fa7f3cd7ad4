"""Image and mask normalisation, and the conversions between PIL images and model tensors.

Every image that enters a generation goes through :func:`normalize_image` (masks through
:func:`normalize_mask`), so the engine only ever sees upright 8-bit RGB images and 8-bit "L" masks.

The tensor conversions import torch when first called, not when this module is imported: requests
and the web UI normalise images here without loading torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from webui.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 8192 * 8192
"""The largest image (width * height) accepted; larger ones are refused, not downscaled."""

BACKGROUND = (255, 255, 255)
"""Colour that transparent pixels are composited onto (white, as AUTOMATIC1111's img2img default)."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def normalize_image(image: Any, name: str) -> Image.Image:
    """Return ``image`` as an upright 8-bit RGB image; ``name`` is the field named in errors.

    Accepts a PIL image, a path, or a numpy array (H×W, H×W×3 or H×W×4). The EXIF orientation is
    applied. Conversions to RGB:

    * transparency (RGBA, LA, PA, a palette with a transparent index) is composited onto white,
      the background AUTOMATIC1111 uses by default for img2img, since the colour under a
      transparent pixel is arbitrary and usually black;
    * 16-bit samples ("I;16", "I;16B", and "I" with values in [0, 65535]) keep their top 8 bits
      (``v >> 8``); other "I" images are stretched linearly from their min..max to 0..255;
    * float ("F") images are read as [0, 1] if they lie in it, as [0, 255] if they lie in that,
      and are otherwise stretched from their min..max;
    * "P", "L", "1", "CMYK", "YCbCr" and the rest use Pillow's conversion.

    Raises :class:`InvalidRequestError` for anything that is not an image, for an empty image and
    for one with more than :data:`MAX_PIXELS` pixels.
    """
    img = _load(image, name)
    img = _exif_upright(img)
    return _to_rgb(img, name)


def normalize_mask(mask: Any, size: tuple[int, int]) -> Image.Image:
    """Return ``mask`` as an 8-bit "L" image of ``size`` (width, height); white marks the area to change.

    A mask with an alpha channel (RGBA, LA, PA, a palette with transparency) uses the alpha channel
    when any pixel is not fully opaque, and its luminance otherwise; every other mode is converted
    to luminance (16-bit and float masks scaled as in :func:`normalize_image`). A mask whose size
    differs from ``size`` is resized to it with bilinear filtering and stays grayscale (soft edges
    are kept; the mask is thresholded or blurred later), so a size mismatch is never an error.
    """
    img = _exif_upright(_load(mask, "mask"))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        img = img.convert("LA" if img.mode in ("LA", "La") else "RGBA")
        alpha = img.getchannel("A")
        lo, _hi = alpha.getextrema()
        out = alpha if lo < 255 else img.convert("L")
    elif img.mode == "L":
        out = img.copy()
    elif img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        out = _high_depth_to_l(img)
    else:
        out = _convert(img, "L", "mask")
    width, height = (int(v) for v in size)
    if out.size != (width, height):
        out = out.resize((width, height), Image.Resampling.BILINEAR)
    return out


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (1, 3, H, W) float32 tensor in [-1, 1] (the VAE's input range)."""
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = 2.0 * arr - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """An "L" mask as a (1, 1, H, W) float32 tensor in [0, 1]."""
    import torch

    arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None]


def tensor_to_images(t: torch.Tensor) -> list[Image.Image]:
    """Decoded images, (B, 3, H, W) or (3, H, W) in [-1, 1], as RGB PIL images.

    The arithmetic is that of diffusers' ``VaeImageProcessor.postprocess(..., output_type="pil")``
    (denormalise and clamp in the tensor's own dtype, then float32, ``* 255``, round half to even,
    uint8), so the pixels are identical to a diffusers pipeline's.
    """
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[1] not in (3, 4):
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(t.shape)}")
    t = (t.detach() * 0.5 + 0.5).clamp(0, 1)
    arr = t.cpu().permute(0, 2, 3, 1).float().numpy()
    arr = (arr * 255).round().astype("uint8")
    return [Image.fromarray(np.ascontiguousarray(a[:, :, :3])) for a in arr]


def resize_to(
    image: Image.Image,
    width: int,
    height: int,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """``image`` resized to exactly ``width`` × ``height`` (a copy when it already has that size)."""
    if width < 1 or height < 1:
        raise InvalidRequestError(f"cannot resize an image to {width}x{height}")
    if image.size == (width, height):
        return image.copy()
    return image.resize((width, height), resample)


# --- helpers -----------------------------------------------------------------------------------


def _load(obj: Any, name: str) -> Image.Image:
    """A PIL image from a PIL image, a path or an array, with its size checked."""
    if isinstance(obj, Image.Image):
        _check_size(obj, name)
        try:
            obj.load()
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"{name} is not a readable image ({exc})") from None
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return _open(Path(obj), name)
    if isinstance(obj, np.ndarray):
        img = _from_array(obj, name)
        _check_size(img, name)
        return img
    raise InvalidRequestError(f"{name} must be an image, got {type(obj).__name__}")


def _open(path: Path, name: str) -> Image.Image:
    """Open and decode an image file, checking its size before decoding the pixels."""
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise InvalidRequestError(f"{name}: file not found: {path}") from None
    except Image.DecompressionBombError:
        raise InvalidRequestError(f"{name} is too large (more than {MAX_PIXELS} pixels): {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidRequestError(f"{name} is not a readable image: {path} ({exc})") from None
    try:
        _check_size(img, name)
        img.load()
    except InvalidRequestError:
        img.close()
        raise
    except (Image.DecompressionBombError, OSError, ValueError) as exc:
        img.close()
        raise InvalidRequestError(f"{name} is not a readable image: {path} ({exc})") from None
    return img


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    """An image from an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidRequestError(f"{name} must be an H×W, H×W×3 or H×W×4 array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidRequestError(f"{name} is empty ({arr.shape[1]}x{arr.shape[0]} pixels)")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        if arr.dtype == np.uint8:
            return Image.fromarray(arr)
        if arr.dtype == np.uint16:
            return Image.fromarray(arr.astype("<u2"))
        if np.issubdtype(arr.dtype, np.integer):
            return Image.fromarray(arr.astype(np.int32))
        if np.issubdtype(arr.dtype, np.floating):
            return Image.fromarray(arr.astype(np.float32))
    else:
        if arr.dtype == np.uint16:
            arr = arr >> 8
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise InvalidRequestError(f"{name} contains NaN or infinite values")
            scale = 255.0 if float(arr.max()) <= 1.0 else 1.0
            arr = np.round(arr.astype(np.float64) * scale).clip(0, 255)
        elif not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
            raise InvalidRequestError(f"{name}: unsupported array values ({arr.dtype}, expected 0..255)")
        return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    raise InvalidRequestError(f"{name}: unsupported array type {arr.dtype}")


def _check_size(img: Image.Image, name: str) -> None:
    check_pixels(*img.size, name)


def check_pixels(width: int, height: int, name: str) -> None:
    """Raise :class:`InvalidRequestError` for an empty image or one over :data:`MAX_PIXELS`
    (one line naming ``name`` and the size; the web app checks uploads with it before decoding)."""
    if width <= 0 or height <= 0:
        raise InvalidRequestError(f"{name} is empty ({width}x{height} pixels)")
    if width * height > MAX_PIXELS:
        raise InvalidRequestError(
            f"{name} is too large: {width}x{height} is {width * height} pixels, the limit is {MAX_PIXELS}"
        )


def _exif_upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says; unchanged when the EXIF data is unreadable."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not make the image unusable
        return img


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode == "P":
        if "transparency" in img.info:
            return _flatten(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in _ALPHA_MODES:
        return _flatten(img.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _high_depth_to_l(img).convert("RGB")
    return _convert(img, "RGB", name)


def _flatten(rgba: Image.Image) -> Image.Image:
    """An RGBA image composited onto :data:`BACKGROUND`."""
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit "L"."""
    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray((arr.astype(np.uint16) >> 8).astype(np.uint8))
    if img.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 0xFFFF:
            return Image.fromarray((arr >> 8).astype(np.uint8))
        return Image.fromarray(_stretch(arr.astype(np.float64), lo, hi))
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        data = np.where(finite, data, 0.0)
    lo, hi = float(data.min()), float(data.max())
    if lo >= 0.0 and hi <= 1.0:
        out = np.round(data * 255.0)
    elif lo >= 0.0 and hi <= 255.0:
        out = np.round(data)
    else:
        return Image.fromarray(_stretch(data, lo, hi))
    return Image.fromarray(out.astype(np.uint8))


def _stretch(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.round((data - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def _convert(img: Image.Image, mode: str, name: str) -> Image.Image:
    try:
        return img.convert(mode)
    except (ValueError, OSError) as exc:
        raise InvalidRequestError(f"{name}: cannot convert a {img.mode!r} image to {mode} ({exc})") from None


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``width`` x ``height`` times ``scale`` (rounded, at least 1 pixel); a scale that is not a
    finite number above 0 is an :class:`InvalidRequestError`."""
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise InvalidRequestError(f"the upscale factor must be a number above 0, got {scale!r}")
    return max(1, round(width * scale)), max(1, round(height * scale))
