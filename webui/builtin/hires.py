"""Built-in hires fix (text to image): generate at the base size, upscale, and denoise again at the
target size with a second pass of its own strength, steps, sampler and prompts, as AUTOMATIC1111's
"Hires. fix" does.

Upscaling is either in latent space (:data:`LATENT_UPSCALERS`, A1111's names: the first pass's
latents interpolated to the target size) or in pixel space through any image upscaler the engine
has (``engine.upscalers``: Lanczos, Nearest and upscaler model files), between a decode and an
encode. The target is ``hr_scale`` times the base size, or ``hr_resize_x`` by ``hr_resize_y`` (one
of them 0: the other keeps the aspect ratio; both set and another aspect ratio: the upscaled image
is cropped to it, centred), rounded down to a multiple of 8.

The fields are declared once (``register_fields``), so the "Hires fix" group on the text-to-image
tab, ``launch.py generate --enable-hr --hr-scale 2``, the HTTP API's ``enable_hr``/``hr_*`` keys and
the infotext entries (``Hires upscale``, ``Hires resize``, ``Hires steps``, ``Hires upscaler``,
``Hires sampler``, ``Hires prompt``, ``Hires negative prompt``, ``Denoising strength``; A1111's
keys, which PNG Info reads back) all come from here. The size the second pass works at is the
request's ``peak_size``: the size limits and the memory plan are checked and chosen for it, and
the second pass runs inside the same out-of-memory ladder as the first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from webui.api import (
    GenerationRequest,
    InvalidRequestError,
    OutputImage,
    RunContext,
    SecondPass,
    hookimpl,
    image_to_tensor,
    tensor_to_images,
)

LATENT_STUDIO_API = 1
GROUP = "Hires fix"
SAME_SAMPLER = "Use same sampler"
FACTOR = 8  # every size of the second pass is a multiple of it
# A1111's latent upscale modes: name -> (torch interpolation mode, antialias)
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_UPSCALER = "Latent"


def _resize_part(index: int) -> Callable[[Mapping[str, Any]], Any]:
    """Read one side of ``Hires resize: WxH`` from a parsed infotext."""

    def read(parsed: Mapping[str, Any]) -> int | None:
        text = str(parsed.get("Hires resize", ""))
        parts = text.lower().split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() and len(part.strip()) <= 5 for part in parts):
            return None
        return int(parts[index])

    return read


def _enabled(parsed: Mapping[str, Any]) -> bool | None:
    return True if "Hires upscale" in parsed or "Hires resize" in parsed else None


@hookimpl
def register_fields(register: Callable[..., Any]) -> None:
    common = {"tasks": ("txt2img",), "group": GROUP, "record": "hook"}
    register(
        "enable_hr",
        "bool",
        default=False,
        label="Hires fix",
        help="generate at the base size, upscale, then denoise again at the target size",
        read=_enabled,
        **common,
    )
    register(
        "hr_upscaler",
        "choice",
        default=DEFAULT_UPSCALER,
        choices="upscalers:hires",
        label="Upscaler",
        help="latent (fast, needs strength ~0.5+) or an image upscaler",
        infotext="Hires upscaler",
        **common,
    )
    register(
        "hr_scale",
        "float",
        default=2.0,
        minimum=1.0,
        maximum=8.0,
        ui_maximum=4.0,
        step=0.05,
        label="Upscale by",
        help="target = base size x this (unless resize width/height are set)",
        infotext="Hires upscale",
        **common,
    )
    register(
        "hr_second_pass_steps",
        "int",
        default=0,
        minimum=0,
        maximum=10_000,
        ui_maximum=150,
        step=1,
        limit="max_steps",
        label="Hires steps",
        help="steps of the second pass (0 = as many as the first)",
        infotext="Hires steps",
        **common,
    )
    register(
        "hr_denoising_strength",
        "float",
        default=0.7,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        label="Denoising strength",
        help="how much the second pass changes the upscaled image",
        infotext="Denoising strength",
        **common,
    )
    for index, side in enumerate(("x", "y")):
        register(
            f"hr_resize_{side}",
            "int",
            default=0,
            minimum=0,
            maximum=8192,
            ui_maximum=2048,
            step=8,
            label=f"Resize {'width' if side == 'x' else 'height'} to",
            help="0: from 'Upscale by' (or keep the aspect ratio when the other side is set)",
            read=_resize_part(index),
            **common,
        )
    register(
        "hr_sampler_name",
        "choice",
        default=None,
        choices="samplers",
        none_label=SAME_SAMPLER,
        nullable=True,
        label="Hires sampler",
        help="the second pass's sampler",
        infotext="Hires sampler",
        **common,
    )
    for name, label, key in (
        ("hr_prompt", "Hires prompt", "Hires prompt"),
        ("hr_negative_prompt", "Hires negative prompt", "Hires negative prompt"),
    ):
        register(
            name,
            "text",
            default="",
            max_chars=10_000,
            label=label,
            help="empty: the first pass's",
            infotext=key,
            lines=2,
            **common,
        )


def enabled(request: GenerationRequest) -> bool:
    return request.task == "txt2img" and bool(request.extra.get("enable_hr"))


def target_size(width: int, height: int, extra: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """``(width, height, upscaled_width, upscaled_height)``: the second pass's size, and the size the
    first pass's result is upscaled to before it is cropped (centred) to that size."""
    resize_x: float = int(extra.get("hr_resize_x") or 0)
    resize_y: float = int(extra.get("hr_resize_y") or 0)
    if not resize_x and not resize_y:
        scale = float(extra.get("hr_scale") or 1.0)
        out_w, out_h = _snap(width * scale), _snap(height * scale)
        return out_w, out_h, out_w, out_h
    if not resize_y:
        resize_y = resize_x * height / width
    elif not resize_x:
        resize_x = resize_y * width / height
    out_w, out_h = _snap(resize_x), _snap(resize_y)
    cover = max(out_w / width, out_h / height)  # upscale to cover the target, then crop the excess
    return out_w, out_h, max(out_w, math.ceil(width * cover)), max(out_h, math.ceil(height * cover))


def _snap(side: float) -> int:
    return max(FACTOR, int(side) // FACTOR * FACTOR)


@hookimpl
def prepare_request(request: GenerationRequest, context: RunContext) -> None:
    if not enabled(request):
        return
    engine = context.engine
    name = request.extra.get("hr_upscaler") or DEFAULT_UPSCALER
    known = upscaler_names(engine)
    if name not in known:
        raise InvalidRequestError(f"unknown hires upscaler {name!r}; choose one of: {', '.join(known)}")
    sampler = request.extra.get("hr_sampler_name")
    if sampler and engine is not None:
        engine.schedulers.get(sampler)  # an unknown name fails here, before any step
    width, height = _first_size(request, context)
    out_w, out_h, up_w, up_h = target_size(width, height, request.extra)
    context.peak_size = (max(out_w, up_w), max(out_h, up_h))


def _first_size(request: GenerationRequest, context: RunContext) -> tuple[int, int]:
    bundle = context.bundle
    return request.width or bundle.default_size, request.height or bundle.default_size


def upscaler_names(engine: Any) -> list[str]:
    """The latent upscalers, then the engine's image upscalers."""
    images = getattr(engine, "upscalers", None)
    return [*LATENT_UPSCALERS, *(images.names() if images is not None else [])]


@hookimpl
def second_pass(request: GenerationRequest, context: RunContext, latents: torch.Tensor) -> SecondPass | None:
    if not enabled(request):
        return None
    extra = request.extra
    out_w, out_h, up_w, up_h = target_size(context.width, context.height, extra)
    name = extra.get("hr_upscaler") or DEFAULT_UPSCALER
    factor = context.bundle.vae_scale_factor
    if name in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[name]
        size = (up_h // factor, up_w // factor)
        options: dict[str, Any] = {"antialias": True} if antialias else {}
        if mode in ("bilinear", "bicubic"):
            options["align_corners"] = False
        upscaled = torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, **options)
        start = _crop(upscaled, out_h // factor, out_w // factor).to(latents.dtype)
    else:
        engine = context.engine
        pixels = engine.decode_latents(context.bundle, latents)
        images = [
            engine.upscalers.upscale(image, name, size=(up_w, up_h)) for image in tensor_to_images(pixels)
        ]
        tensor = torch.cat([_crop(image_to_tensor(image), out_h, out_w) for image in images])
        start = engine.encode_images(context.bundle, tensor, context.generators())
    steps = int(extra.get("hr_second_pass_steps") or 0) or request.steps
    strength = float(extra.get("hr_denoising_strength", 0.7))
    if 0 < strength and int(steps * strength) < 1:  # as A1111: a low strength still runs one step
        steps = math.ceil(1 / strength)
    changes: dict[str, Any] = {
        "width": out_w,
        "height": out_h,
        "steps": steps,
        "strength": strength,
    }
    if extra.get("hr_sampler_name"):
        changes["sampler"] = extra["hr_sampler_name"]
    if extra.get("hr_prompt"):
        changes["prompt"] = extra["hr_prompt"]
    if extra.get("hr_negative_prompt"):
        changes["negative_prompt"] = extra["hr_negative_prompt"]
    return SecondPass(request=request.replace(**changes), latents=start)


def _crop(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centred ``height`` x ``width`` part of a (B, C, H, W) tensor."""
    top, left = (tensor.shape[-2] - height) // 2, (tensor.shape[-1] - width) // 2
    return tensor[..., top : top + height, left : left + width]


@hookimpl
def write_metadata(
    parameters: dict[str, Any], image: OutputImage, request: GenerationRequest, context: RunContext
) -> None:
    if not enabled(request):
        return
    extra = request.extra
    parameters["Denoising strength"] = extra.get("hr_denoising_strength")
    if extra.get("hr_resize_x") or extra.get("hr_resize_y"):
        out_w, out_h, _, _ = target_size(context.width, context.height, extra)
        parameters["Hires resize"] = f"{out_w}x{out_h}"
    else:
        parameters["Hires upscale"] = extra.get("hr_scale")
    if extra.get("hr_second_pass_steps"):
        parameters["Hires steps"] = extra["hr_second_pass_steps"]
    parameters["Hires upscaler"] = extra.get("hr_upscaler") or DEFAULT_UPSCALER
    for key, name in (
        ("Hires sampler", "hr_sampler_name"),
        ("Hires prompt", "hr_prompt"),
        ("Hires negative prompt", "hr_negative_prompt"),
    ):
        if extra.get(name):
            parameters[key] = extra[name]
