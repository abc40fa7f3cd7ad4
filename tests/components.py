"""Tiny random-weight model components for the tests (no network, CPU, seconds).

Shapes follow diffusers' own test dummies: a 2-block UNet, a 2-block VAE (downscale 2), small
CLIP text encoders; the images they make are 64×64 noise-like pictures, which is all parity needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from tiny import make_clip_tokenizer, make_text_encoder

from webui.engine.bundle import ModelBundle

SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
)


def make_unet(seed: int = 0, in_channels: int = 4, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    ).eval()


def make_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
        norm_num_groups=32,
    ).eval()


def make_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
    ).eval()


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
    """Components for diffusers' StableDiffusion*Pipeline constructors."""
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
        "unet": make_sdxl_unet(0),
        "vae": make_vae(0),
        "text_encoder": make_text_encoder(0),
        "text_encoder_2": make_text_encoder(1, projection=True),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        ),
    }


def bundle_from(components: dict[str, Any], *, name: str = "tiny", controlnet: Any = None) -> ModelBundle:
    """The engine's view of the same components."""
    encoders = [components[k] for k in ("text_encoder", "text_encoder_2") if k in components]
    tokenizers = [components[k] for k in ("tokenizer", "tokenizer_2") if k in components]
    sdxl = len(encoders) == 2
    return ModelBundle(
        name=name,
        unet=components["unet"],
        vae=components["vae"],
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler_config=dict(components["scheduler"].config),
        family="sdxl" if sdxl else "sd1",
        controlnets={"seg": controlnet} if controlnet is not None else {},
        model_hash="0123456789",
        config={"force_zeros_for_empty_prompt": True} if sdxl else {},
    )
