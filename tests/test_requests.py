"""Bad or unusual request input: each refused with its own error type, or accepted and converted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fixtures_models import random_image, rect_mask, seg_classes, seg_map, tiny_bundle
from PIL import Image

from webui.engine.pipeline import Engine
from webui.engine.segmap import ADE20K, snap_to_palette
from webui.errors import InvalidRequestError, UnknownSamplerError
from webui.hookspecs import hookimpl
from webui.images import mask_to_tensor
from webui.plugins import make_plugin_manager
from webui.request import GenerationRequest

BASE = dict(prompt="a red circle", sampler="Euler", steps=2, cfg_scale=7.0, seed=5, width=64, height=64)


@pytest.fixture(scope="module")
def bundle(controlnet_bundle):
    """This module's tests run on the tiny model with its segmentation ControlNet (conftest.py)."""
    return controlnet_bundle


def run(engine, bundle, **kwargs):
    return engine.generate(GenerationRequest(**{**BASE, **kwargs}), bundle=bundle)


def pixels(result) -> torch.Tensor:
    return torch.stack([item.pixels for item in result.images])


def refused(error_type, **kwargs) -> str:
    """The message of the error ``GenerationRequest(**kwargs).validate()`` raises; its type must be exact."""
    with pytest.raises(error_type) as info:
        GenerationRequest(**{**BASE, **kwargs}).validate()
    assert type(info.value) is error_type
    message = str(info.value)
    assert "\n" not in message
    return message


# -- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "low", "high"),
    [("width", 100, 96, 104), ("height", 60, 56, 64), ("width", 12, 8, 16), ("height", 513, 512, 520)],
)
def test_size_not_multiple_of_8_names_nearest_sizes(field, value, low, high):
    message = refused(InvalidRequestError, **{field: value})
    assert f"{field} {value} is not a multiple of 8" in message
    assert f"use {low} or {high}" in message


def test_size_is_refused_by_generate_not_rounded(engine, bundle):
    with pytest.raises(InvalidRequestError, match="use 96 or 104"):
        run(engine, bundle, width=100)


@pytest.mark.parametrize("value", [0, 4, -8, 8200])
def test_size_out_of_range(value):
    message = refused(InvalidRequestError, width=value)
    assert "width must be between 8 and 8192" in message


# -- steps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1, -20])
def test_zero_or_negative_steps(steps):
    message = refused(InvalidRequestError, steps=steps)
    assert f"steps must be between 1 and 1000, got {steps}" in message


def test_fractional_steps():
    assert "steps must be a whole number" in refused(InvalidRequestError, steps=2.5)


def test_zero_steps_refused_by_generate(engine, bundle):
    with pytest.raises(InvalidRequestError, match="steps"):
        run(engine, bundle, steps=0)


# -- sampler --------------------------------------------------------------------------------------


def test_unknown_sampler_lists_available(engine, bundle):
    with pytest.raises(UnknownSamplerError) as info:
        run(engine, bundle, sampler="Nope")
    message = str(info.value)
    assert "'Nope'" in message
    for name in engine.schedulers.names():
        assert name in message
    for name in ("Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"):
        assert name in message
    assert isinstance(info.value, InvalidRequestError)  # callers catching the base class still see it


def test_unknown_sampler_is_refused_before_loading_a_model():
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[]))  # no model at all
    with pytest.raises(UnknownSamplerError):
        engine.generate(GenerationRequest(**{**BASE, "sampler": "Nope"}))


def test_sampler_names_are_case_insensitive(engine, bundle):
    result = run(engine, bundle, sampler="euler A")
    assert len(result.images) == 1


# -- strength -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [-0.1, 1.5, 2.0])
def test_strength_outside_unit_interval(strength):
    message = refused(InvalidRequestError, task="img2img", init_image=random_image(1), strength=strength)
    assert "strength must be between 0 and 1" in message


def test_strength_nan():
    message = refused(InvalidRequestError, task="img2img", init_image=random_image(1), strength=math.nan)
    assert "strength must be a number" in message


def test_strength_outside_unit_interval_refused_by_generate(engine, bundle):
    with pytest.raises(InvalidRequestError, match="strength"):
        run(engine, bundle, task="img2img", init_image=random_image(1), strength=1.5)


def test_strength_too_low_for_the_steps(engine, bundle):
    with pytest.raises(InvalidRequestError, match="no step to run"):
        run(engine, bundle, task="img2img", init_image=random_image(1), strength=0.2, steps=2)


# -- masks ----------------------------------------------------------------------------------------


class MaskSpy:
    """Records the final mask of the request and the binary mask handed to the UNet."""

    def __init__(self) -> None:
        self.request_masks: list[Image.Image] = []
        self.conditioning_masks: list[torch.Tensor] = []

    @hookimpl(trylast=True)
    def provide_conditioning(self, request, context, conditioning):
        self.request_masks.append(request.mask.copy())
        self.conditioning_masks.append(conditioning.mask.clone())


@pytest.mark.parametrize("mask_size", [(32, 32), (40, 24), (128, 128)])
def test_mask_of_another_size_is_resized(bundle, mask_size):
    init = random_image(2)
    small = rect_mask(64).resize(mask_size, Image.Resampling.BILINEAR)
    expected = small.resize(init.size, Image.Resampling.BILINEAR)

    checked = GenerationRequest(**BASE, task="inpaint", init_image=init, mask=small).validate()
    assert checked.mask.mode == "L" and checked.mask.size == init.size
    assert np.array_equal(np.asarray(checked.mask), np.asarray(expected))

    spy = MaskSpy()
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[], extra=[spy]))
    kwargs = dict(task="inpaint", init_image=init, mask_blur=0, strength=1.0)
    resized = run(engine, bundle, mask=small, **kwargs)
    same_size = run(engine, bundle, mask=expected, **kwargs)
    assert float((pixels(resized) - pixels(same_size)).abs().max()) == 0.0
    assert np.array_equal(np.asarray(resized.images[0].image), np.asarray(same_size.images[0].image))
    assert resized.images[0].image.size == (64, 64)

    used, reference = spy.request_masks
    assert used.size == (64, 64)
    assert np.array_equal(np.asarray(used), np.asarray(expected))
    assert torch.equal(spy.conditioning_masks[0], (mask_to_tensor(expected) >= 0.5).float())
    assert torch.equal(spy.conditioning_masks[0], spy.conditioning_masks[1])


def test_mask_without_image_is_refused():
    message = refused(InvalidRequestError, task="inpaint", mask=rect_mask())
    assert "init_image" in message


# -- init image modes -----------------------------------------------------------------------------


def rgba_image() -> Image.Image:
    rgba = np.dstack([np.asarray(random_image(3)), np.full((64, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0  # left half fully transparent
    rgba[:32, 32:, 3] = 128  # top right half transparent
    return Image.fromarray(rgba, "RGBA")


def rgba_expected(image: Image.Image) -> Image.Image:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")


def palette_image() -> Image.Image:
    return random_image(4).convert("P")


def sixteen_bit_image() -> Image.Image:
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return image


def sixteen_bit_expected(image: Image.Image) -> Image.Image:
    top = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    return Image.fromarray(np.dstack([top] * 3), "RGB")


@pytest.mark.parametrize(
    ("make", "expected_of"),
    [
        (rgba_image, rgba_expected),
        (palette_image, lambda image: image.convert("RGB")),
        (sixteen_bit_image, sixteen_bit_expected),
    ],
    ids=["RGBA", "P", "I;16"],
)
def test_init_image_modes_are_converted(engine, bundle, make, expected_of):
    image = make()
    expected = expected_of(image)
    checked = GenerationRequest(**BASE, task="img2img", init_image=image).validate()
    assert checked.init_image.mode == "RGB" and checked.init_image.size == (64, 64)
    assert np.array_equal(np.asarray(checked.init_image), np.asarray(expected))

    kwargs = dict(task="img2img", strength=0.75, steps=4, batch_size=2)
    result = run(engine, bundle, init_image=image, **kwargs)
    assert len(result.images) == 2
    for item in result.images:
        assert item.image.mode == "RGB" and item.image.size == (64, 64)
        assert tuple(item.pixels.shape) == (3, 64, 64)
        assert torch.isfinite(item.pixels).all()
    as_rgb = run(engine, bundle, init_image=expected, **kwargs)
    assert float((pixels(result) - pixels(as_rgb)).abs().max()) == 0.0


def test_init_image_of_another_size_uses_the_requested_size(engine, bundle):
    result = run(engine, bundle, task="img2img", init_image=random_image(5, size=96), strength=0.75, steps=4)
    assert result.images[0].image.size == (64, 64)


def test_init_image_size_is_the_default_size(engine, bundle):
    init = random_image(5, size=48)
    result = run(
        engine, bundle, task="img2img", init_image=init, width=None, height=None, strength=0.75, steps=4
    )
    assert result.images[0].image.size == (48, 48)
    assert result.images[0].parameters["Size"] == "48x48"


def test_init_image_that_is_not_an_image():
    message = refused(InvalidRequestError, task="img2img", init_image=42)
    assert "init_image must be an image" in message


# -- segmentation maps ----------------------------------------------------------------------------


def off_palette_map(delta: int = 3) -> Image.Image:
    exact = np.asarray(seg_map()).astype(np.int16)
    rows, cols = np.indices(exact.shape[:2])
    sign = np.where((rows + cols) % 2 == 0, 1, -1)[..., None]
    shifts = sign * np.array([delta, -delta, delta])  # every channel off by `delta`
    return Image.fromarray(np.clip(exact + shifts, 0, 255).astype(np.uint8))


def test_off_palette_seg_map_maps_to_nearest_class(engine, bundle):
    off = off_palette_map()
    exact_colors = {tuple(c) for c in ADE20K.colors.tolist()}
    off_colors = {tuple(c) for c in np.asarray(off).reshape(-1, 3).tolist()}
    assert not off_colors & exact_colors  # no pixel is a palette colour
    _, classes, off_count = snap_to_palette(off)
    assert off_count == 64 * 64
    assert np.array_equal(classes, seg_classes())

    kwargs = dict(task="seg2img", steps=3, control_scale=1.0)
    from_off = run(engine, bundle, seg_map=off, **kwargs)
    from_exact = run(engine, bundle, seg_map=seg_map(), **kwargs)
    assert float((pixels(from_off) - pixels(from_exact)).abs().max()) == 0.0
    without = run(engine, bundle, steps=3)
    assert float((pixels(from_exact) - pixels(without)).abs().max()) > 0.01


def test_seg_map_of_another_size_is_resized(engine, bundle):
    result = run(engine, bundle, task="seg2img", seg_map=seg_map(32))
    assert result.images[0].image.size == (64, 64)


def test_seg_map_needs_a_controlnet(engine, tmp_path):
    plain = tiny_bundle(tmp_path)
    with pytest.raises(InvalidRequestError, match="--controlnet"):
        run(engine, plain, task="seg2img", seg_map=seg_map())


# -- task / image mismatch ------------------------------------------------------------------------


def test_inpaint_without_mask():
    message = refused(InvalidRequestError, task="inpaint", init_image=random_image(1))
    assert "inpainting needs an image and a mask" in message


def test_inpaint_without_mask_refused_by_generate(engine, bundle):
    with pytest.raises(InvalidRequestError, match="mask"):
        run(engine, bundle, task="inpaint", init_image=random_image(1))


def test_inpaint_without_anything():
    assert "inpainting needs an image and a mask" in refused(InvalidRequestError, task="inpaint")


def test_img2img_without_init_image():
    assert "img2img needs an init image" in refused(InvalidRequestError, task="img2img")


def test_seg2img_without_seg_map():
    assert "seg2img needs a segmentation map" in refused(InvalidRequestError, task="seg2img")


def test_unknown_task():
    assert "unknown task 'paint'" in refused(InvalidRequestError, task="paint")
