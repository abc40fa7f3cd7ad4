"""The engine's images equal diffusers' reference pipelines for the same components and seed."""

from __future__ import annotations

import numpy as np
import pytest
from components import bundle_from, make_controlnet, sd_components, sdxl_components
from diffusers import (
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from fixtures_models import random_image, rect_mask, seg_map
from parity import assert_close, ours, reference

pytestmark = pytest.mark.slow  # real models or many generations: left out of the quick run

PROMPT = "a red circle at the top left"
NEGATIVE = "blurry, low quality"


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DDIM", "DPM++ 2M Karras", "PNDM", "Heun", "UniPC"])
def test_txt2img_matches_stable_diffusion_pipeline(engine, tmp_path, sampler):
    components = sd_components(tmp_path)
    pipe = StableDiffusionPipeline(**components)
    seeds = [11, 12]
    ref = reference(
        pipe,
        sampler,
        engine,
        seeds,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=4,
        guidance_scale=7.5,
        height=64,
        width=64,
    )
    got = ours(
        engine,
        bundle_from(components),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        sampler=sampler,
        steps=4,
        cfg_scale=7.5,
        seed=11,
        batch_size=2,
        width=64,
        height=64,
    )
    assert_close(got, ref)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
def test_img2img_matches_img2img_pipeline(engine, tmp_path, sampler):
    components = sd_components(tmp_path)
    pipe = StableDiffusionImg2ImgPipeline(**components)
    init = random_image(3)
    seeds = [5, 6]
    ref = reference(
        pipe,
        sampler,
        engine,
        seeds,
        prompt=PROMPT,
        image=init,
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=6.0,
    )
    got = ours(
        engine,
        bundle_from(components),
        task="img2img",
        prompt=PROMPT,
        init_image=init,
        strength=0.6,
        sampler=sampler,
        steps=5,
        cfg_scale=6.0,
        seed=5,
        batch_size=2,
        width=64,
        height=64,
    )
    assert_close(got, ref)


@pytest.mark.parametrize("in_channels", [9, 4])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_matches_inpaint_pipeline(engine, tmp_path, in_channels, strength):
    components = sd_components(tmp_path, in_channels=in_channels)
    pipe = StableDiffusionInpaintPipeline(**components)
    init, mask = random_image(4), rect_mask()
    ref = reference(
        pipe,
        "DDIM",
        engine,
        [21],
        prompt=PROMPT,
        image=init,
        mask_image=mask,
        strength=strength,
        num_inference_steps=4,
        guidance_scale=7.0,
        height=64,
        width=64,
    )
    got = ours(
        engine,
        bundle_from(components),
        task="inpaint",
        prompt=PROMPT,
        init_image=init,
        mask=mask,
        strength=strength,
        mask_blur=0,
        keep_unmasked=False,
        sampler="DDIM",
        steps=4,
        cfg_scale=7.0,
        seed=21,
        width=64,
        height=64,
    )
    assert_close(got, ref)


def test_controlnet_matches_controlnet_pipeline(engine, tmp_path):
    components = sd_components(tmp_path)
    controlnet = make_controlnet(components["unet"])
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=controlnet)
    seg = seg_map()
    ref = reference(
        pipe,
        "Euler",
        engine,
        [7],
        prompt=PROMPT,
        image=seg,
        num_inference_steps=4,
        guidance_scale=7.0,
        controlnet_conditioning_scale=0.8,
        control_guidance_start=0.0,
        control_guidance_end=0.75,
        height=64,
        width=64,
    )
    got = ours(
        engine,
        bundle_from(components, controlnet=controlnet),
        task="seg2img",
        prompt=PROMPT,
        seg_map=seg,
        control_scale=0.8,
        control_start=0.0,
        control_end=0.75,
        sampler="Euler",
        steps=4,
        cfg_scale=7.0,
        seed=7,
        width=64,
        height=64,
    )
    assert_close(got, ref)
    # and the map really steers the image
    without = ours(
        engine,
        bundle_from(components, controlnet=controlnet),
        prompt=PROMPT,
        sampler="Euler",
        steps=4,
        cfg_scale=7.0,
        seed=7,
        width=64,
        height=64,
    )
    assert float(np.abs(without - got).max()) > 0.01


@pytest.mark.parametrize("negative", ["", NEGATIVE])
def test_sdxl_matches_sdxl_pipeline(engine, tmp_path, negative):
    components = sdxl_components(tmp_path)
    pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    ref = reference(
        pipe,
        "Euler",
        engine,
        [3],
        prompt=PROMPT,
        negative_prompt=negative or None,
        num_inference_steps=4,
        guidance_scale=5.0,
        height=64,
        width=64,
    )
    got = ours(
        engine,
        bundle_from(components),
        prompt=PROMPT,
        negative_prompt=negative,
        sampler="Euler",
        steps=4,
        cfg_scale=5.0,
        seed=3,
        width=64,
        height=64,
    )
    assert_close(got, ref)
