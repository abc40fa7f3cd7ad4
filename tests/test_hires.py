"""The hires fix (webui/builtin/hires.py) on a tiny model: the second pass's size, steps, sampler,
prompts and strength, latent and image upscalers, A1111's infotext keys read back by PNG Info, the
size limits and memory plan taken for the larger pass, and the out-of-memory ladder around both."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from components import bundle_from

from webui.api import hookimpl, make_plugin_manager
from webui.builtin import hires
from webui.engine import pipeline
from webui.engine.memory import MemorySettings
from webui.engine.pipeline import Engine
from webui.errors import InvalidRequestError
from webui.images import image_to_tensor, tensor_to_images
from webui.limits import LimitExceeded, Limits
from webui.metadata import parse_infotext
from webui.request import GenerationRequest

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

BASE = dict(model="tiny", prompt="a red square", negative_prompt="", steps=4, seed=3, width=64, height=48)


def make_engine(components, *extra, **kwargs):
    engine = Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[], extra=extra), **kwargs)
    engine.models.add("tiny", bundle_from(components))
    return engine


@pytest.fixture(scope="module")
def engine(components):
    return make_engine(components)


def run(engine, callback=None, **hr):
    request = engine.fields.new_request("txt2img", {**BASE, **hr})
    return engine.generate(request, callback=callback)


def pixels(result):
    return np.stack([np.asarray(item.image, dtype=np.int16) for item in result.images])


def test_switched_off_it_changes_nothing(engine):
    plain = engine.generate(GenerationRequest(**BASE))
    off = run(engine, enable_hr=False, hr_scale=2.0, hr_prompt="something else")
    assert np.array_equal(pixels(plain), pixels(off))
    assert "Hires" not in off.infotexts[0] and "Denoising strength" not in off.infotexts[0]


def test_the_second_pass_runs_at_the_target_size_with_its_own_steps(engine):
    steps = []
    result = run(
        engine,
        callback=lambda info: steps.append((info.total, tuple(info.latents.shape[-2:]))),
        enable_hr=True,
        hr_scale=1.5,
        hr_second_pass_steps=6,
        hr_denoising_strength=0.5,
    )
    assert result.images[0].image.size == (96, 72)
    f = engine.models.get("tiny").vae_scale_factor
    first = [s for s in steps if s[1] == (48 // f, 64 // f)]
    second = [s for s in steps if s[1] == (72 // f, 96 // f)]
    assert len(first) == 4 and len(second) == 3  # 6 hires steps at strength 0.5 run 3
    assert steps == first + second  # the first pass, then the second
    info = parse_infotext(result.infotexts[0])
    assert info["Size-1"] == "64" and info["Size-2"] == "48"  # the infotext keeps the first pass's size
    assert info["Hires upscale"] == "1.5" and info["Hires steps"] == "6"
    assert info["Hires upscaler"] == "Latent" and info["Denoising strength"] == "0.5"


def test_strength_zero_is_the_first_pass_upscaled_in_latent_space(engine, components):
    captured = []
    result = run(
        engine,
        callback=lambda info: captured.append(info.latents.clone()),
        enable_hr=True,
        hr_scale=2.0,
        hr_upscaler="Latent (nearest)",
        hr_denoising_strength=0.0,
    )
    assert len(captured) == 4  # no second-pass step
    bundle = engine.models.get("tiny")
    upscaled = torch.nn.functional.interpolate(captured[-1], scale_factor=2, mode="nearest")
    expected = np.asarray(tensor_to_images(engine.decode_latents(bundle, upscaled))[0], dtype=np.int16)
    assert result.images[0].image.size == (128, 96)
    assert np.array_equal(pixels(result)[0], expected)


@pytest.mark.parametrize("name", list(hires.LATENT_UPSCALERS))
def test_every_latent_upscaler_gives_the_target_size(engine, name):
    result = run(engine, enable_hr=True, hr_scale=1.25, hr_upscaler=name, hr_second_pass_steps=2)
    assert result.images[0].image.size == (80, 56)  # 60 rounds down to a multiple of 8
    assert parse_infotext(result.infotexts[0])["Hires upscaler"] == name


def test_resize_to_a_width_keeps_the_aspect_and_both_sides_crop(engine):
    one = run(engine, enable_hr=True, hr_resize_x=128, hr_second_pass_steps=2)
    assert one.images[0].image.size == (128, 96)
    both = run(engine, enable_hr=True, hr_resize_x=96, hr_resize_y=96, hr_second_pass_steps=2)
    assert both.images[0].image.size == (96, 96)
    assert parse_infotext(both.infotexts[0])["Hires resize"] == "96x96"
    assert hires.target_size(64, 48, {"hr_resize_x": 96, "hr_resize_y": 96}) == (96, 96, 128, 96)


def test_the_hires_prompt_and_sampler_change_the_second_pass_only(engine):
    first = []
    same = run(
        engine, callback=lambda i: first.append(i.latents.clone()), enable_hr=True, hr_second_pass_steps=2
    )
    other_first = []
    other = run(
        engine,
        callback=lambda i: other_first.append(i.latents.clone()),
        enable_hr=True,
        hr_second_pass_steps=2,
        hr_prompt="a blue circle",
        hr_sampler_name="Euler",
    )
    assert all(torch.equal(a, b) for a, b in zip(first[:4], other_first[:4], strict=True))
    assert not np.array_equal(pixels(same), pixels(other))
    info = parse_infotext(other.infotexts[0])
    assert info["Hires prompt"] == "a blue circle" and info["Hires sampler"] == "Euler"
    assert info["Prompt"] == "a red square"


def test_unknown_upscaler_and_sampler_are_refused_before_any_step(engine):
    steps = []
    with pytest.raises(
        InvalidRequestError,
        match=re.escape("unknown hires upscaler 'Latent (bogus)'; choose one of: Latent, "),
    ):
        run(engine, callback=steps.append, enable_hr=True, hr_upscaler="Latent (bogus)")
    with pytest.raises(InvalidRequestError, match="Eulr"):
        run(engine, callback=steps.append, enable_hr=True, hr_sampler_name="Eulr")
    assert steps == []


def test_the_target_size_is_checked_against_the_limits_before_any_step(components):
    engine = make_engine(components, limits=Limits(max_pixels=100 * 100))
    steps = []
    with pytest.raises(LimitExceeded) as raised:
        run(engine, callback=steps.append, enable_hr=True, hr_scale=2.0)
    assert "128x96" in str(raised.value) and "\n" not in str(raised.value)
    assert steps == []
    assert run(engine, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1).images[0].image.size == (96, 72)


def test_the_memory_plan_is_chosen_for_the_second_pass(monkeypatch, engine):
    sizes = []
    real = pipeline.choose_plan

    def spy(settings, bundle, device, *, width, height, batch, **kwargs):
        sizes.append((width, height))
        return real(settings, bundle, device, width=width, height=height, batch=batch, **kwargs)

    monkeypatch.setattr(pipeline, "choose_plan", spy)
    run(engine, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=1)
    assert sizes == [(128, 96)]


class OutOfMemoryInTheSecondPass:
    """Runs out of memory once, on the first step at the second pass's size."""

    def __init__(self) -> None:
        self.raised = 0

    @hookimpl
    def on_step(self, step):
        if step.context.width == 128 and not self.raised:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_running_out_of_memory_in_the_second_pass_retries_both_passes(components):
    trouble = OutOfMemoryInTheSecondPass()
    retried = make_engine(components, trouble)
    result = run(retried, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2)
    assert trouble.raised == 1 and result.images[0].image.size == (128, 96)
    assert "retried after running out of memory" in result.images[0].parameters["Memory"]
    tiled = make_engine(components, memory=MemorySettings(vae_tiling="on"))
    expected = run(tiled, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2)
    assert np.array_equal(pixels(result), pixels(expected))  # both passes again, with the lower plan


def test_png_info_reads_the_hires_keys_back_for_text_to_image_only(engine):
    result = run(
        engine,
        enable_hr=True,
        hr_scale=1.5,
        hr_second_pass_steps=3,
        hr_denoising_strength=0.45,
        hr_upscaler="Latent (bicubic)",
        hr_prompt="a blue circle",
    )
    parsed = parse_infotext(result.infotexts[0])
    values, notes = engine.fields.from_infotext(parsed, task="txt2img")
    assert notes == []
    assert values["enable_hr"] is True and values["hr_scale"] == 1.5 and values["hr_second_pass_steps"] == 3
    assert values["hr_denoising_strength"] == 0.45 and values["hr_upscaler"] == "Latent (bicubic)"
    assert values["hr_prompt"] == "a blue circle"
    img2img, _ = engine.fields.from_infotext(parsed, task="img2img")
    assert img2img["strength"] == 0.45 and "hr_denoising_strength" not in img2img
    resized = parse_infotext("a cat\nSteps: 4, Size: 64x64, Hires resize: 128x96, Hires upscaler: Latent")
    values, _ = engine.fields.from_infotext(resized, task="txt2img")
    assert (values["enable_hr"], values["hr_resize_x"], values["hr_resize_y"]) == (True, 128, 96)
    hostile = parse_infotext("a cat\nSteps: 4, Sampler: Euler, Seed: 1, Hires resize: 99999999999x1")
    values, _ = engine.fields.from_infotext(hostile, task="txt2img")
    assert "hr_resize_x" not in values and values["enable_hr"] is True


def test_out_of_range_values_are_refused(engine):
    with pytest.raises(InvalidRequestError, match="hr_scale"):
        run(engine, enable_hr=True, hr_scale=9.0)


def test_an_image_upscaler_goes_between_a_decode_and_an_encode(engine):
    captured = []
    result = run(
        engine,
        callback=lambda info: captured.append(info.latents.clone()),
        enable_hr=True,
        hr_scale=2.0,
        hr_upscaler="Lanczos",
        hr_denoising_strength=0.0,
    )
    bundle = engine.models.get("tiny")
    first = tensor_to_images(engine.decode_latents(bundle, captured[-1]))[0]
    upscaled = engine.upscalers.upscale(first, "Lanczos", size=(128, 96))
    latents = engine.encode_images(bundle, image_to_tensor(upscaled), [torch.Generator().manual_seed(3)])
    expected = np.asarray(tensor_to_images(engine.decode_latents(bundle, latents))[0], dtype=np.int16)
    assert np.array_equal(pixels(result)[0], expected)
    assert parse_infotext(result.infotexts[0])["Hires upscaler"] == "Lanczos"
    denoised = run(engine, enable_hr=True, hr_scale=2.0, hr_upscaler="Nearest", hr_second_pass_steps=2)
    assert denoised.images[0].image.size == (128, 96)


def test_the_command_line_flags_come_from_the_fields(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    from webui.cli import main
    from webui.metadata import read_png_parameters

    args = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "a red circle",
        "--steps",
        "2",
        "--seed",
        "3",
    ]
    size = ["--width", "64", "--height", "48", "--sampler", "Euler", "--out", str(tmp_path)]
    hr = [
        "--enable-hr",
        "--hr-scale",
        "1.5",
        "--hr-second-pass-steps",
        "2",
        "--hr-upscaler",
        "Latent (nearest)",
    ]
    assert main([*args, *size, *hr]) == 0
    path = [line for line in capsys.readouterr().out.splitlines() if line.strip()][-1]
    assert Image.open(path).size == (96, 72)
    info = parse_infotext(read_png_parameters(path))
    assert info["Hires upscale"] == "1.5" and info["Hires upscaler"] == "Latent (nearest)"
    assert main([*args, *size, "--enable-hr", "--hr-upscaler", "Latent (bogus)"]) == 2
    assert "unknown hires upscaler" in capsys.readouterr().err
