"""Whole tiny models for engine tests, built from the parts in ``tiny``: pipeline component
dicts, ControlNets, and the engine's ModelBundle over the same objects. 64×64 images, seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    ControlNetModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from tiny import bundle_from_components, make_clip_tokenizer, make_text_encoder, make_unet, make_vae

from webui.engine.bundle import ModelBundle
from webui.engine.pipeline import Engine
from webui.plugins import make_plugin_manager

SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    skip_prk_steps=True,
    set_alpha_to_one=False,
)


def make_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    # from_unet zero-initialises the output convolutions; randomise them so the ControlNet matters
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "conv_out" in name:
                param.normal_(0, 0.1)
    return controlnet.eval()


def sd_components(tmp_path: Path, *, in_channels: int = 4) -> dict[str, Any]:
    """Components for diffusers' StableDiffusion*Pipeline constructors (a PNDM default scheduler,
    as real SD 1.x checkpoints ship)."""
    return {
        "unet": make_unet(0, in_channels=in_channels),
        "vae": make_vae(0),
        "text_encoder": make_text_encoder(0),
        "tokenizer": make_clip_tokenizer(tmp_path),
        "scheduler": PNDMScheduler(**SD_SCHEDULER),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def sdxl_components(tmp_path: Path) -> dict[str, Any]:
    tokenizer = make_clip_tokenizer(tmp_path)
    return {
        "unet": make_unet(0, sdxl=True),
        "vae": make_vae(0),
        "text_encoder": make_text_encoder(0),
        "text_encoder_2": make_text_encoder(1, projection=True),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    }


def bundle_from(components: dict[str, Any], *, name: str = "tiny", controlnet: Any = None) -> ModelBundle:
    """The engine's view of the same components (SDXL zeroes empty negative prompts, as diffusers)."""
    sdxl = "text_encoder_2" in components
    bundle = bundle_from_components(components, config={"force_zeros_for_empty_prompt": True} if sdxl else {})
    bundle.name = name
    bundle.model_hash = "0123456789"
    if controlnet is not None:
        bundle.controlnets["seg"] = controlnet
    return bundle


def engine_with(*plugins: Any) -> Engine:
    """An engine with the built-in plugins and ``plugins`` (objects registered in code), nothing
    installed or dropped in."""
    return Engine(plugins=make_plugin_manager(entry_points=False, plugin_dirs=[], extra=plugins))
