"""The denoiser call and the guidance step as hooks (``wrap_denoiser``, ``wrap_guidance``), and the
built-in CFG rescale written on them, equal to diffusers' ``guidance_rescale``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from components import engine_with
from diffusers import StableDiffusionPipeline

from webui.api import (
    GenerationRequest,
    InvalidRequestError,
    hookimpl,
    parse_infotext,
)

BASE = dict(
    prompt="a red circle at the top left",
    negative_prompt="blurry",
    steps=3,
    seed=4,
    width=64,
    height=64,
    sampler="Euler",
    cfg_scale=5.0,
)
TOLERANCE = 1e-3


def pixels(result) -> np.ndarray:
    return np.stack([item.pixels.permute(1, 2, 0).numpy() for item in result.images])


class CountCalls:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float, float | None, tuple[int, ...], bool]] = []

    @hookimpl
    def wrap_denoiser(self, request, context):
        def wrap(call):
            def counted(model_input, step):
                self.calls.append(
                    (
                        step.index,
                        step.total,
                        float(step.timestep),
                        step.sigma,
                        tuple(model_input.shape),
                        step.request is request,
                    )
                )
                return call(model_input, step)

            return counted

        return wrap


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_a_denoiser_wrapper_sees_every_call_with_its_step_and_timestep(bundle, sampler) -> None:
    plain = engine_with().generate(GenerationRequest(**{**BASE, "sampler": sampler}), bundle=bundle)
    counter = CountCalls()
    engine = engine_with(counter)
    counted = engine.generate(
        GenerationRequest(**{**BASE, "sampler": sampler, "batch_count": 2}), bundle=bundle
    )
    scheduler = engine.schedulers.build(sampler, bundle.scheduler_config, seed=4)
    scheduler.set_timesteps(3)
    timesteps = [float(t) for t in scheduler.timesteps]
    sigmas = [float(s) for s in scheduler.sigmas[:3]] if sampler == "Euler" else [None] * 3
    side = 64 // bundle.vae_scale_factor
    per_batch = [
        (i, 3, timesteps[i], sigmas[i], (2, bundle.latent_channels, side, side), True) for i in range(3)
    ]
    assert counter.calls == per_batch * 2  # once per step, per batch; guided: [uncond; cond]
    assert np.array_equal(pixels(counted)[:1], pixels(plain))  # passing the call through changes nothing


def test_a_denoiser_wrapper_can_change_the_text_conditioning(bundle) -> None:
    class NoText:
        @hookimpl
        def wrap_denoiser(self, request, context):
            def wrap(call):
                return lambda x, step: call(
                    x,
                    dataclasses.replace(
                        step, encoder_hidden_states=torch.zeros_like(step.encoder_hidden_states)
                    ),
                )

            return wrap

    plain = pixels(engine_with().generate(GenerationRequest(**BASE), bundle=bundle))
    blind = pixels(engine_with(NoText()).generate(GenerationRequest(**BASE), bundle=bundle))
    other = pixels(
        engine_with(NoText()).generate(
            GenerationRequest(**{**BASE, "prompt": "a green square"}), bundle=bundle
        )
    )
    assert np.abs(plain - blind).max() > 1e-3
    assert np.array_equal(blind, other)  # the prompt no longer reaches the UNet


def test_guidance_wrappers_compose_first_called_outermost(bundle) -> None:
    log: list[str] = []

    class Wrapper:
        def __init__(self, label: str, scale: float | None = None) -> None:
            self.label, self.scale = label, scale

        @hookimpl
        def wrap_guidance(self, request, context):
            def wrap(combine):
                def logged(uncond, cond, scale, step):
                    log.append(f"{self.label} got {scale:g} at {step.index}")
                    out = combine(uncond, cond, scale if self.scale is None else self.scale, step)
                    log.append(f"{self.label} done")
                    return out

                return logged

            return wrap

    # registered inner first, outer last: pluggy calls "outer" first, so it wraps "inner"
    result = engine_with(Wrapper("inner"), Wrapper("outer", scale=7.5)).generate(
        GenerationRequest(**{**BASE, "steps": 1}), bundle=bundle
    )
    assert log == ["outer got 5 at 0", "inner got 7.5 at 0", "inner done", "outer done"]
    # the outer wrapper's scale reached the built-in combination: the image of CFG scale 7.5
    at_7_5 = engine_with().generate(
        GenerationRequest(**{**BASE, "steps": 1, "cfg_scale": 7.5}), bundle=bundle
    )
    assert np.array_equal(pixels(result), pixels(at_7_5))
    assert "CFG scale: 5" in result.infotexts[0]


def test_guidance_wrappers_are_not_called_without_guidance(bundle) -> None:
    calls: list[int] = []

    class Wrapper:
        @hookimpl
        def wrap_guidance(self, request, context):
            return lambda combine: lambda u, c, s, step: calls.append(step.index) or combine(u, c, s, step)

    engine_with(Wrapper()).generate(GenerationRequest(**{**BASE, "cfg_scale": 1.0}), bundle=bundle)
    assert calls == []


# --------------------------------------------------------------------------- CFG rescale


def test_cfg_rescale_matches_diffusers_guidance_rescale(engine, components, bundle) -> None:
    pipe = StableDiffusionPipeline(**components)
    pipe.scheduler = engine.schedulers.build("Euler", dict(pipe.scheduler.config), seed=11)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
    common = dict(prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"], height=64, width=64)
    reference = pipe(
        generator=generators,
        output_type="np",
        num_images_per_prompt=2,
        num_inference_steps=4,
        guidance_scale=7.5,
        guidance_rescale=0.7,
        **common,
    ).images
    request = GenerationRequest(
        **common, sampler="Euler", steps=4, cfg_scale=7.5, seed=11, batch_size=2, extra={"cfg_rescale": 0.7}
    )
    result = engine.generate(request, bundle=bundle)
    got = pixels(result)
    assert got.shape == reference.shape
    assert float(np.abs(got - reference).max()) < TOLERANCE
    assert float(got.std()) > 0.01
    plain = pixels(engine.generate(request.replace(extra={}), bundle=bundle))
    assert float(np.abs(plain - got).max()) > 10 * TOLERANCE  # the rescale really changed the image
    assert parse_infotext(result.infotexts[0])["CFG rescale"] == "0.7"


def test_cfg_rescale_zero_is_off_and_bad_values_are_refused(engine, bundle) -> None:
    plain = engine.generate(GenerationRequest(**BASE), bundle=bundle)
    off = engine.generate(GenerationRequest(**BASE, extra={"cfg_rescale": 0}), bundle=bundle)
    assert np.array_equal(pixels(plain), pixels(off))
    assert "CFG rescale" not in off.infotexts[0]
    for bad in (1.5, -0.1, "high", True, float("nan")):
        with pytest.raises(InvalidRequestError, match="cfg_rescale must be (a number|between 0 and 1)"):
            engine.generate(GenerationRequest(**BASE, extra={"cfg_rescale": bad}), bundle=bundle)
