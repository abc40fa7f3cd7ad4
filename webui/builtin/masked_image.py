"""Built-in masked-image conditioning (inpainting).

* Mask: white = repaint. ``invert_mask`` swaps; ``mask_blur`` (pixels) softens the edge of the
  final composite. The mask given to the UNet is binarised at 0.5, as diffusers does.
* 9-channel inpainting UNets get the mask and the masked-image latents concatenated to their input;
  ordinary 4-channel UNets get latent blending after every step (the engine does both).
* ``masked_content`` sets what the masked area starts from when strength < 1: ``original`` (the
  image), ``fill`` (the surrounding colours smeared in), ``latent noise`` (fresh noise) or
  ``latent nothing`` (zero latents).
* ``only_masked``: the masked region plus ``only_masked_padding`` pixels is cropped (grown to the
  output's aspect ratio), inpainted at the full output size, scaled back and pasted in, so small
  regions get full detail.
* ``keep_unmasked`` (default on): the result is composited over the original through the blurred
  mask, so pixels outside the mask stay exactly as they were.

After ``prepare_request`` the request's ``mask`` is the final mask (inverted and blurred), and
``init_image``/``seg_map`` are the crops when "only masked" is on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from webui.api import (
    Conditioning,
    GenerationRequest,
    OutputImage,
    RunContext,
    hookimpl,
    image_to_tensor,
    mask_to_tensor,
)

LATENT_STUDIO_API = 1

STATE_KEY = "masked_image"


@dataclass
class _Paste:
    original: Image.Image  # the full init image
    mask: Image.Image  # final mask at the original's size (L)
    box: tuple[int, int, int, int] | None  # crop box for "only masked"


@hookimpl
def prepare_request(request: GenerationRequest, context: RunContext) -> None:
    if request.mask is None or request.init_image is None:
        return
    mask = request.mask
    if request.invert_mask:
        mask = ImageOps.invert(mask)
    if request.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
    paste = _Paste(original=request.init_image, mask=mask, box=None)
    request.mask = mask
    if request.only_masked:
        width = request.width or context.bundle.default_size
        height = request.height or context.bundle.default_size
        box = crop_region(mask, request.only_masked_padding, width / height)
        if box is not None:
            paste.box = box
            request.init_image = request.init_image.crop(box).resize(
                (width, height), Image.Resampling.LANCZOS
            )
            request.mask = mask.crop(box).resize((width, height), Image.Resampling.BILINEAR)
            if request.seg_map is not None:
                seg = request.seg_map.resize(paste.original.size, Image.Resampling.NEAREST)
                request.seg_map = seg.crop(box).resize((width, height), Image.Resampling.NEAREST)
            request.width, request.height = width, height
    context.state[STATE_KEY] = paste


@hookimpl(trylast=True)  # after the init-image plugin, whose image it may fill
def provide_conditioning(request: GenerationRequest, context: RunContext, conditioning: Conditioning) -> None:
    if request.mask is None or request.init_image is None:
        return
    size = (context.width, context.height)
    mask = request.mask.resize(size, Image.Resampling.BILINEAR) if request.mask.size != size else request.mask
    mask_t = (mask_to_tensor(mask) >= 0.5).float()
    if conditioning.init_image is None:
        image = request.init_image.resize(size, Image.Resampling.LANCZOS)
        conditioning.init_image = image_to_tensor(image)
        conditioning.strength = float(request.strength)
    init = conditioning.init_image
    conditioning.mask = mask_t
    conditioning.masked_image = init * (mask_t < 0.5)
    mode = request.masked_content
    if mode == "fill":
        filled = fill_masked(request.init_image.resize(size, Image.Resampling.LANCZOS), mask)
        conditioning.init_image = image_to_tensor(filled)
    elif mode in ("latent noise", "latent nothing"):
        conditioning.init_latent_transforms.append(_latent_fill(mask_t, noise=mode == "latent noise"))

    meta = conditioning.metadata
    meta["Mask blur"] = request.mask_blur
    if request.invert_mask:
        meta["Mask mode"] = "Inpaint not masked"
    if mode != "original":
        meta["Masked content"] = mode
    if request.only_masked:
        meta["Inpaint area"] = "Only masked"
        meta["Masked area padding"] = request.only_masked_padding


@hookimpl
def postprocess_images(images: list[OutputImage], request: GenerationRequest, context: RunContext) -> None:
    paste: _Paste | None = context.state.get(STATE_KEY)
    if paste is None:
        return
    for item in images:
        if paste.box is not None:
            left, top, right, bottom = paste.box
            patch = item.image.resize((right - left, bottom - top), Image.Resampling.LANCZOS)
            canvas = paste.original.copy()
            canvas.paste(patch, (left, top), paste.mask.crop(paste.box))
            item.image = canvas
        elif request.keep_unmasked:
            size = item.image.size
            original = (
                paste.original.resize(size, Image.Resampling.LANCZOS)
                if paste.original.size != size
                else paste.original
            )
            mask = (
                paste.mask.resize(size, Image.Resampling.BILINEAR) if paste.mask.size != size else paste.mask
            )
            item.image = Image.composite(item.image, original, mask)


def crop_region(mask: Image.Image, padding: int, aspect: float) -> tuple[int, int, int, int] | None:
    """The box around the mask's non-zero pixels, padded, grown to ``aspect`` (w/h), inside the image."""
    bbox = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if bbox is None:
        return None
    img_w, img_h = mask.size
    left, top, right, bottom = bbox
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, img_w), min(bottom + padding, img_h)
    width, height = right - left, bottom - top
    if width / height < aspect:  # too narrow: widen
        width = min(img_w, round(height * aspect))
    else:  # too flat: heighten
        height = min(img_h, round(width / aspect))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(cx - width / 2, 0), img_w - width))
    top = int(min(max(cy - height / 2, 0), img_h - height))
    return left, top, left + width, top + height


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Replace the masked area with the surrounding colours, blurred in from coarse to fine."""
    keep = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0 < 0.5
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if keep.any():
        mean = pixels[keep].mean(axis=0)
    else:
        mean = pixels.reshape(-1, 3).mean(axis=0)
    current = np.where(keep[..., None], pixels, mean)
    for radius in (64, 16, 4, 1):
        weight = Image.fromarray((keep * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
        blurred = Image.fromarray(np.clip(current * keep[..., None], 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(radius)
        )
        w = np.asarray(weight, dtype=np.float32)[..., None] / 255.0
        estimate = np.where(w > 1e-3, np.asarray(blurred, dtype=np.float32) / np.maximum(w, 1e-3), current)
        current = np.where(keep[..., None], pixels, np.clip(estimate, 0, 255))
    return Image.fromarray(current.astype(np.uint8))


def _latent_fill(mask: torch.Tensor, *, noise: bool):
    def transform(latents: torch.Tensor, context: RunContext) -> torch.Tensor:
        m = torch.nn.functional.interpolate(mask, size=latents.shape[-2:]).to(latents)
        if not noise:
            return latents * (1 - m)
        # a stream of its own per image, so it does not repeat the initial noise of the same seed
        generators = [torch.Generator().manual_seed(s ^ 0x9E3779B9) for s in context.seeds]
        fresh = torch.cat([torch.randn(latents.shape[1:], generator=g).unsqueeze(0) for g in generators])
        fresh = fresh.to(latents)
        return latents * (1 - m) + fresh * m

    return transform
