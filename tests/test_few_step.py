"""Few-step models run as their authors intend: LCM and TCD samplers, the trailing ("SGM
Uniform") schedule of Turbo and Lightning models, a distilled LCM UNet's guidance input, CFG 1
without the unconditional pass; each equal to diffusers' own pipelines on tiny models. And a
sampler's class defaults never override what a latent model needs (DDIM's clipping)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from components import bundle_from, sd_components
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
from parity import assert_close, ours, reference
from tiny import make_unet

pytestmark = pytest.mark.slow  # pipelines side by side

PROMPT = "a red circle at the top left"


def test_the_few_step_samplers_are_registered_under_the_names_users_know(engine):
    names = set(engine.schedulers.names())
    assert {"LCM", "TCD", "Euler SGM Uniform", "Euler a SGM Uniform", "DPM++ 2M SGM Uniform"} <= names
    config = dict(sd_components_config())
    trailing = engine.schedulers.build("Euler SGM Uniform", config)
    trailing.set_timesteps(4)
    assert [int(t) for t in trailing.timesteps] == [999, 749, 499, 249]  # from the last step down
    leading = engine.schedulers.build("Euler", config)
    leading.set_timesteps(4)
    assert int(leading.timesteps[0]) != 999
    lcm = engine.schedulers.build("LCM", config)
    lcm.set_timesteps(4)
    assert len(lcm.timesteps) == 4 and int(lcm.timesteps[0]) == 999


def sd_components_config() -> dict:
    from components import SD_SCHEDULER
    from diffusers import PNDMScheduler

    return dict(PNDMScheduler(**SD_SCHEDULER).config)


@pytest.mark.parametrize("sampler", ["Euler SGM Uniform", "Euler a SGM Uniform", "DPM++ 2M SGM Uniform"])
def test_turbo_style_trailing_schedule_at_cfg_1_matches_diffusers(engine, tmp_path, sampler):
    components = sd_components(tmp_path)
    pipe = StableDiffusionPipeline(**components)
    ref = reference(
        pipe,
        sampler,
        engine,
        [5],
        prompt=PROMPT,
        num_inference_steps=2,
        guidance_scale=1.0,
        height=64,
        width=64,
    )
    got = ours(
        engine,
        bundle_from(components),
        prompt=PROMPT,
        sampler=sampler,
        steps=2,
        cfg_scale=1.0,
        seed=5,
        width=64,
        height=64,
    )
    assert_close(got, ref)


def test_tcd_with_its_gamma_matches_diffusers(engine, tmp_path):
    components = sd_components(tmp_path)
    pipe = StableDiffusionPipeline(**components)
    ref = reference(
        pipe, "TCD", engine, [8, 9], prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, eta=0.3,
        height=64, width=64,
    )  # fmt: skip
    got = ours(
        engine,
        bundle_from(components),
        prompt=PROMPT,
        sampler="TCD",
        steps=4,
        cfg_scale=1.0,
        eta=0.3,  # TCD's gamma: the share of noise put back each step
        seed=8,
        batch_size=2,
        width=64,
        height=64,
    )
    assert_close(got, ref)


def test_a_distilled_lcm_unet_gets_its_guidance_as_an_input_like_the_lcm_pipeline(engine, tmp_path):
    components = sd_components(tmp_path)
    components["unet"] = make_unet(3, time_cond_proj_dim=32)
    pipe = LatentConsistencyModelPipeline(
        **{k: v for k, v in components.items() if k != "requires_safety_checker"},
        requires_safety_checker=False,
    )
    ref = reference(
        pipe,
        "LCM",
        engine,
        [4],
        prompt=PROMPT,
        num_inference_steps=4,
        guidance_scale=8.0,
        height=64,
        width=64,
    )
    got = ours(
        engine,
        bundle_from(components),
        prompt=PROMPT,
        sampler="LCM",
        steps=4,
        cfg_scale=8.0,
        seed=4,
        width=64,
        height=64,
    )
    assert_close(got, ref)
    # the guidance is an input, not a second pass: another scale gives another image
    other = ours(
        engine,
        bundle_from(components),
        prompt=PROMPT,
        sampler="LCM",
        steps=4,
        cfg_scale=2.0,
        seed=4,
        width=64,
        height=64,
    )
    assert float(np.abs(other - got).max()) > 1e-3


def test_cfg_1_runs_one_unet_pass_per_step(engine, tmp_path):
    components = sd_components(tmp_path)
    bundle = bundle_from(components)
    batches: list[int] = []
    hook = bundle.unet.register_forward_pre_hook(lambda module, args: batches.append(int(args[0].shape[0])))
    try:
        for cfg in (1.0, 7.0):
            ours(
                engine,
                bundle,
                prompt=PROMPT,
                sampler="LCM",
                steps=2,
                cfg_scale=cfg,
                seed=1,
                width=64,
                height=64,
            )
    finally:
        hook.remove()
    assert batches == [1, 1, 2, 2]  # CFG 1: the conditional half only; CFG 7: both halves


def test_ddim_never_clips_latents_unless_the_model_says_so(engine):
    """DDIM's and DDPM's class default clips the predicted clean sample to [-1, 1], which is right
    for pixels and wrong for latents: a model config that does not mention it (an Euler model's)
    gets no clipping; one that asks for it keeps it; a sampler without the option gets no key."""
    config = {k: v for k, v in sd_components_config().items() if k != "clip_sample"}
    assert engine.schedulers.build("DDIM", config).config.clip_sample is False
    assert engine.schedulers.build("DDIM", {**config, "clip_sample": True}).config.clip_sample is True
    assert "clip_sample" not in engine.schedulers.build("Euler", config).config
    scheduler = engine.schedulers.build("DDIM", config)
    scheduler.set_timesteps(4)
    latents = torch.full((1, 4, 8, 8), 3.0)  # a latent far outside [-1, 1], predicted exactly
    t = scheduler.timesteps[-1]
    alpha = scheduler.alphas_cumprod[int(t)]
    noisy = alpha.sqrt() * latents  # the epsilon prediction of zero noise
    out = scheduler.step(torch.zeros_like(latents), t, noisy).pred_original_sample
    assert torch.allclose(out, latents, atol=1e-4)
