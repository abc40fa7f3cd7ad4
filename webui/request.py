"""The typed, validated, per-request description of one generation.

A :class:`GenerationRequest` carries everything a generation needs, including the model choice:
nothing about a request lives in global state, so two users of one server never see each other's
settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from webui.errors import InvalidRequestError
from webui.images import normalize_image, normalize_mask

Task = Literal["txt2img", "img2img", "inpaint", "seg2img"]
TASKS: tuple[str, ...] = ("txt2img", "img2img", "inpaint", "seg2img")
MaskedContent = Literal["original", "fill", "latent noise", "latent nothing"]
MASKED_CONTENT: tuple[str, ...] = ("original", "fill", "latent noise", "latent nothing")

MAX_STEPS = 1000
MAX_SIDE = 8192
MAX_BATCH = 64


@dataclass
class GenerationRequest:
    """One generation: the model, the task, the prompts, the images and the sampling parameters.

    Sizes: ``width`` and ``height`` must be multiples of 8 (the VAE's downscale factor); other
    values are refused with the nearest valid sizes in the message rather than silently changed (a
    ``prepare_request`` plugin may round them instead). ``None`` means the model's native size.

    Seeds: ``seed=-1`` picks a random seed. Image ``k`` of the request uses ``seed + k``, so any
    image of a batch can be reproduced alone, as in AUTOMATIC1111.
    """

    task: Task = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    model: str | None = None
    sampler: str = "DPM++ 2M Karras"
    steps: int = 20
    cfg_scale: float | None = None  # None: the model's recommended guidance (7 unless it says)
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    eta: float = 0.0
    # img2img (also the image to inpaint)
    init_image: Image.Image | None = None
    strength: float = 0.75
    # inpainting
    mask: Image.Image | None = None
    mask_blur: int = 4
    invert_mask: bool = False
    masked_content: MaskedContent = "original"
    only_masked: bool = False
    only_masked_padding: int = 32
    keep_unmasked: bool = True
    # segmentation map -> ControlNet
    seg_map: Image.Image | None = None
    controlnet: str | None = None
    control_scale: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0
    # free-form values for plugins; they appear in the metadata when a plugin writes them
    # a separate VAE by name (None or "Automatic": the model's own)
    vae: str | None = None

    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    def validate(self, *, sizes: bool = True) -> GenerationRequest:
        """Check every field; return a normalised copy (RGB images, binary-ready L masks).

        Raises :class:`InvalidRequestError` with a one-line message naming the field.
        ``sizes=False`` skips the multiple-of-8 check (the engine checks sizes only after the
        ``prepare_request`` plugins, which may round them).
        """
        if self.task not in TASKS:
            raise InvalidRequestError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        _check_int("batch_count", self.batch_count, 1, 10_000)
        _check_int("clip_skip", self.clip_skip, 1, 12)
        _check_int("mask_blur", self.mask_blur, 0, 256)
        _check_int("only_masked_padding", self.only_masked_padding, 0, 4096)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -1 <= self.seed < 2**32:
            raise InvalidRequestError(f"seed must be -1 (random) or an integer in [0, 2**32), got {self.seed!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_int(name, value, 8, MAX_SIDE)
            if sizes and value % 8:
                low, high = value - value % 8, value - value % 8 + 8
                raise InvalidRequestError(
                    f"{name} {value} is not a multiple of 8; use {low} or {high}"
                )
        if self.cfg_scale is not None:
            _check_float("cfg_scale", self.cfg_scale, 0.0, 100.0)
        _check_float("strength", self.strength, 0.0, 1.0)
        _check_float("eta", self.eta, 0.0, 1.0)
        _check_float("control_scale", self.control_scale, 0.0, 10.0)
        _check_float("control_start", self.control_start, 0.0, 1.0)
        _check_float("control_end", self.control_end, 0.0, 1.0)
        if self.control_start > self.control_end:
            raise InvalidRequestError("control_start must not be after control_end")
        if self.masked_content not in MASKED_CONTENT:
            raise InvalidRequestError(
                f"unknown masked_content {self.masked_content!r}; choose one of {', '.join(MASKED_CONTENT)}"
            )
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InvalidRequestError("prompt and negative_prompt must be text")
        _check_text("prompt", self.prompt)
        _check_text("negative prompt", self.negative_prompt)
        if self.vae is not None and not isinstance(self.vae, str):
            raise InvalidRequestError(f"vae must be a VAE name, got {self.vae!r}")

        init = normalize_image(self.init_image, "init_image") if self.init_image is not None else None
        seg = normalize_image(self.seg_map, "seg_map") if self.seg_map is not None else None
        mask = None
        if self.mask is not None:
            if init is None:
                raise InvalidRequestError("a mask needs an image to inpaint (init_image)")
            mask = normalize_mask(self.mask, init.size)
        if self.task == "img2img" and init is None:
            raise InvalidRequestError("img2img needs an init image")
        if self.task == "inpaint" and (init is None or mask is None):
            raise InvalidRequestError("inpainting needs an image and a mask")
        if self.task == "seg2img" and seg is None:
            raise InvalidRequestError("seg2img needs a segmentation map")
        return self.replace(init_image=init, mask=mask, seg_map=seg, extra=dict(self.extra))


def _check_text(name: str, text: str) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (from bytes that were not UTF-8 on a
    command line, or a JSON ``\\ud800`` escape) can be neither tokenized nor saved."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(
            f"the {name} is not valid text: character {error.start + 1} is a lone surrogate "
            f"({text[error.start]!a}); was it written in another encoding than UTF-8?"
        ) from None


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}, got {value}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise InvalidRequestError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low:g} and {high:g}, got {value:g}")
