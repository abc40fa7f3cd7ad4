"""The tests' own writer of original-layout ("single-file", LDM) checkpoints from diffusers components.

Independent of the loader under test: the names below are written from the original latent-diffusion
layouts, not taken from a conversion script.

* UNet ``model.diffusion_model.``: ``input_blocks.0.0`` is the input conv; then per level
  ``layers_per_block`` blocks ``[resnet, transformer?]`` and a ``[downsample.op]`` block (not after the
  last level); ``middle_block.[resnet, transformer, resnet]``; ``output_blocks`` per level
  ``layers_per_block + 1`` blocks ``[resnet, transformer?, upsample?]``; ``out.0``/``out.2``;
  ``time_embed.0/2``; SDXL's ``label_emb.0.0/0.2``. Resnets: ``in_layers.0/2``, ``emb_layers.1``,
  ``out_layers.0/3``, ``skip_connection``. Transformers keep diffusers' inner names.
* VAE ``first_stage_model.``: ``encoder.down.{i}.block.{j}`` / ``.downsample``, ``mid.block_1/2``,
  ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convolutions), ``norm_out``; the decoder's ``up.{i}``
  counts from the lowest resolution, the reverse of diffusers' ``up_blocks``; ``nin_shortcut``.
* OpenAI CLIP (SD 1.x, SDXL's first encoder): the Hugging Face model under ``transformer.text_model.``.
* OpenCLIP (SD 2.x, SDXL's second encoder, the refiner's): ``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.{i}.{ln_1, attn.in_proj_weight (q, k, v stacked), attn.out_proj, ln_2,
  mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection`` (width x projection, the transpose of a
  linear layer's weight), ``logit_scale``.
* ControlNet ``control_model.``: the UNet's encoder half, ``zero_convs.{i}.0``, ``middle_block_out.0``
  and ``input_hint_block`` (convolutions at even indices, SiLUs between them).

The tiny components obey the families' head rules (SD 1.x: 8 UNet heads; SD 2.x/SDXL UNets and all
text encoders: 64-channel heads) and use CLIP's real 49,408-token vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

RESNET_NAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _count(state: dict[str, Any], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def _resnet(rest: str) -> str:
    for diffusers, ldm in RESNET_NAMES:
        if rest.startswith(diffusers + "."):
            return ldm + rest[len(diffusers) :]
    raise KeyError(rest)


def _encoder_half(key: str, per_level: int) -> str | None:
    """LDM name of a UNet/ControlNet encoder parameter (None when ``key`` is not one)."""
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (per_level + 1) + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (per_level + 1) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (per_level + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    fixed = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    module, _, kind = key.rpartition(".")
    return f"{fixed[module]}.{kind}" if module in fixed else None


def unet_to_ldm(
    state: dict[str, torch.Tensor], prefix: str = "model.diffusion_model."
) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the original layout."""
    per_level = _count(state, r"down_blocks\.0\.resnets\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = _encoder_half(key, per_level)
        if name is None and (m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            name = f"output_blocks.{int(m[1]) * (per_level + 1) + int(m[2])}.0.{_resnet(m[3])}"
        elif name is None and (m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key)):
            name = f"output_blocks.{int(m[1]) * (per_level + 1) + int(m[2])}.1.{m[3]}"
        elif name is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)):
            has_attention = any(k.startswith(f"up_blocks.{m[1]}.attentions.") for k in state)
            name = f"output_blocks.{int(m[1]) * (per_level + 1) + per_level}.{2 if has_attention else 1}.conv.{m[2]}"
        elif name is None:
            module, _, kind = key.rpartition(".")
            name = f"{ {'conv_norm_out': 'out.0', 'conv_out': 'out.2'}[module] }.{kind}"
        out[prefix + name] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original layout."""
    levels = _count(state, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        part, _, rest = key.partition(".")
        if part in ("quant_conv", "post_quant_conv"):
            out[prefix + key] = tensor
            continue
        name = rest.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(.+)", name):
            name = f"down.{m[1]}.block.{m[2]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", name):
            name = f"down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(.+)", name):
            name = f"up.{levels - 1 - int(m[1])}.block.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
            name = f"up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", name):
            name = f"mid.block_{int(m[1]) + 1}.{m[2]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", name):
            name = f"mid.attn_1.{VAE_ATTENTION[m[1]]}.{m[2]}"
            if tensor.dim() == 2:  # the original attention uses 1x1 convolutions
                tensor = tensor[:, :, None, None]
        out[f"{prefix}{part}.{name}"] = tensor
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP text model (Hugging Face names) under ``prefix`` + ``text_model.``, with the
    ``position_ids`` buffer older checkpoints carry."""
    out = {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}
    positions = state[next(k for k in state if k.endswith("position_embedding.weight"))].shape[0]
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def open_clip_to_ldm(
    state: dict[str, torch.Tensor], prefix: str, *, extra_layer: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A CLIP text model in OpenCLIP's layout. ``extra_layer`` appends one more (random) block, as
    SD 2.x files hold the last OpenCLIP block that diffusers' penultimate-layer model drops; an
    encoder without a projection gets a random ``text_projection`` as those files carry one."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer_names = {
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    layers = _count(state, r"encoder\.layers\.(\d+)\.")
    for key, tensor in state.items():
        if key in simple:
            out[prefix + simple[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2].startswith("self_attn.") and m[2] != "self_attn.out_proj":
                continue  # q, k, v are stacked below
            out[f"{prefix}transformer.resblocks.{m[1]}.{layer_names[m[2]]}.{m[3]}"] = tensor
    for i in range(layers):
        for kind, suffix in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            stacked = [state[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{i}.attn.{suffix}"] = torch.cat(stacked)
    generator = torch.Generator().manual_seed(seed)
    device = out[prefix + "token_embedding.weight"].device

    def random(*shape: int) -> torch.Tensor:  # shapes only for models built on the meta device
        return (
            torch.empty(shape, device=device)
            if device.type == "meta"
            else torch.randn(shape, generator=generator)
        )

    if extra_layer:
        for key in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.0.")]:
            out[key.replace("resblocks.0.", f"resblocks.{layers}.")] = random(*out[key].shape)
    width = out[prefix + "token_embedding.weight"].shape[1]
    out.setdefault(prefix + "text_projection", random(width, width))
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def controlnet_to_ldm(
    state: dict[str, torch.Tensor], prefix: str = "control_model."
) -> dict[str, torch.Tensor]:
    """A diffusers ``ControlNetModel`` state dict in the original ControlNet layout."""
    per_level = _count(state, r"down_blocks\.0\.resnets\.(\d+)\.")
    blocks = _count(state, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = _encoder_half(key, per_level)
        if name is None and (m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key)):
            name = f"zero_convs.{m[1]}.0.{m[2]}"
        elif name is None and (m := re.match(r"controlnet_mid_block\.(.+)", key)):
            name = f"middle_block_out.0.{m[1]}"
        elif name is None and (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key)):
            name = f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
        elif name is None and (m := re.match(r"controlnet_cond_embedding\.conv_in\.(.+)", key)):
            name = f"input_hint_block.0.{m[1]}"
        elif name is None and (m := re.match(r"controlnet_cond_embedding\.conv_out\.(.+)", key)):
            name = f"input_hint_block.{2 * (blocks + 1)}.{m[1]}"
        if name is None:
            raise KeyError(key)
        out[prefix + name] = tensor
    return out


# -- tiny models -------------------------------------------------------------------------------


def text_encoder(
    seed: int, *, width: int, layers: int = 2, gelu: bool = False, projection: int | None = None
) -> Any:
    """A tiny CLIP text encoder with CLIP's vocabulary and 64-channel heads."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=width + 32,
        num_attention_heads=width // 64,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        hidden_act="gelu" if gelu else "quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        projection_dim=projection or width,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def unet(
    seed: int, family: str, *, in_channels: int = 4, cross: int, pooled: int = 0, time_ids: int = 6
) -> Any:
    """A tiny UNet shaped like ``family``'s (attention placement, projection, heads by its rule)."""
    torch.manual_seed(seed)
    if family == "sd1":
        kwargs: dict[str, Any] = dict(
            block_out_channels=(32, 64),
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    elif family == "sd2":
        kwargs = dict(
            block_out_channels=(64, 128),
            attention_head_dim=(1, 2),
            use_linear_projection=True,
            upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    else:  # sdxl: no attention at the first level, deeper transformers below, pooled text + time ids
        kwargs = dict(
            block_out_channels=(64, 128),
            attention_head_dim=(1, 2),
            use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=time_ids * 8 + pooled,
        )
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        cross_attention_dim=cross,
        **kwargs,
    ).eval()


def vae(seed: int, *, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A tiny VAE (scale factor 2, two resnets per level so the shortcut and attention names occur)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=scaling_factor,
    ).eval()


def tiny_components(kind: str, seed: int = 0) -> dict[str, Any]:
    """The diffusers components of a tiny model: ``"sd1"``, ``"sd1-inpainting"``, ``"sd2-v"``,
    ``"sdxl"``, ``"sdxl-inpainting"`` or ``"sdxl-refiner"`` (unet, vae, text_encoders list)."""
    inpainting = kind.endswith("-inpainting")
    in_channels = 9 if inpainting else 4
    if kind.startswith("sd1"):
        encoders = [text_encoder(seed + 1, width=64)]
        return {
            "unet": unet(seed, "sd1", in_channels=in_channels, cross=64),
            "vae": vae(seed + 2),
            "text_encoders": encoders,
        }
    if kind.startswith("sd2"):
        encoders = [text_encoder(seed + 1, width=128, gelu=True)]
        return {
            "unet": unet(seed, "sd2", in_channels=in_channels, cross=128),
            "vae": vae(seed + 2),
            "text_encoders": encoders,
        }
    if kind == "sdxl-refiner":
        encoders = [text_encoder(seed + 1, width=128, gelu=True, projection=64)]
        return {
            "unet": unet(seed, "sdxl", cross=128, pooled=64, time_ids=5),
            "vae": vae(seed + 2, scaling_factor=0.13025),
            "text_encoders": encoders,
        }
    encoders = [text_encoder(seed + 1, width=64), text_encoder(seed + 3, width=128, gelu=True, projection=64)]
    return {
        "unet": unet(seed, "sdxl", in_channels=in_channels, cross=192, pooled=64),
        "vae": vae(seed + 2, scaling_factor=0.13025),
        "text_encoders": encoders,
    }


def to_ldm(kind: str, components: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole original-layout state dict of ``tiny_components(kind)``, with the schedule buffers
    and EMA bookkeeping real checkpoints carry."""
    state = {**unet_to_ldm(components["unet"].state_dict()), **vae_to_ldm(components["vae"].state_dict())}
    encoders = [e.state_dict() for e in components["text_encoders"]]
    if kind.startswith("sd1"):
        state.update(clip_to_ldm(encoders[0], "cond_stage_model.transformer."))
    elif kind.startswith("sd2"):
        state.update(open_clip_to_ldm(encoders[0], "cond_stage_model.model.", extra_layer=True))
    elif kind == "sdxl-refiner":
        state.update(open_clip_to_ldm(encoders[0], "conditioner.embedders.0.model."))
    else:
        state.update(clip_to_ldm(encoders[0], "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(encoders[1], "conditioner.embedders.1.model."))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    state["model_ema.decay"] = torch.tensor(0.9999)
    return state


def write_single_file(
    path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``state`` as one ``.safetensors`` file (contiguous copies; shared storage is not allowed)."""
    path = Path(path)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path), metadata=metadata)
    return path
