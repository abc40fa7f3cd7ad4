"""Diffusers configurations read off an original-layout (LDM) checkpoint's tensor shapes.

Everything here works on ``{name: shape}`` only (a safetensors header is enough), so a checkpoint
can be described before a single tensor is read. The family's shipped settings
(``webui/configs/<family>.json``) fill in what weights cannot show; every dimension the weights do
show replaces the shipped value, so the real full-size models and tiny test models both come out
right.

What cannot be read from weights, and the rule used instead:

* attention head counts: SD 1.x has 8 heads per UNet attention; SD 2.x and SDXL UNets, and every
  CLIP text encoder, have heads of 64 channels (``unet_heads`` / ``head_width`` in the configs);
* SDXL's time-id embedding width: ``(addition input - pooled width) / time-id count`` (6 time ids
  for the base model, 5 for the refiner, which adds an aesthetic score);
* activation functions, norm groups, VAE scaling factor and the scheduler: the family's.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from webui.errors import ModelLoadError

Shapes = Mapping[str, tuple[int, ...]]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROLNET_PREFIX = "control_model."
CONTROLNET_CONV_OUT = 14  # diffusers' converter expects the hint block's last conv at this index


@lru_cache(maxsize=8)
def _read_family_config(name: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"the shipped configuration {path} is missing or unreadable: {exc}") from exc


def family_config(name: str) -> dict[str, Any]:
    """A fresh copy of the shipped settings of ``name`` ("sd1", "sd2", "sdxl", "sdxl-refiner")."""
    return copy.deepcopy(_read_family_config(name))


def strip_prefix(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (a regex with one group) over the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.match(k))})


def _shape(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelLoadError(f"{what}: the checkpoint lacks {key!r}; its layout is not understood")
    return shapes[key]


# -- UNet and ControlNet ------------------------------------------------------------------------


def _down_levels(s: Shapes, what: str) -> dict[str, Any]:
    """The encoder half shared by UNets and ControlNets: ``input_blocks`` and ``middle_block``."""
    indices = _indices(s, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in indices if f"input_blocks.{i}.0.op.weight" in s]
    levels = len(downsamplers) + 1
    resnets = [i for i in indices if i != 0 and i not in downsamplers]
    per_level = len(resnets) // levels
    if (
        not indices
        or per_level == 0
        or len(resnets) != per_level * levels
        or indices != list(range(levels * (per_level + 1)))
    ):
        raise ModelLoadError(
            f"{what}: input_blocks {indices[:3]}...{indices[-3:]} do not form a UNet encoder"
        )
    conv_in = _shape(s, "input_blocks.0.0.weight", what)
    channels, depths, attention = [], [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        channels.append(_shape(s, f"input_blocks.{first}.0.out_layers.3.weight", what)[0])
        depth = len(_indices(s, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."))
        attention.append(depth > 0)
        depths.append(depth)
    attn_keys = sorted(k for k in s if k.endswith("attn2.to_k.weight"))
    if not attn_keys:
        raise ModelLoadError(f"{what}: no cross-attention layers found (not a text-conditioned UNet)")
    proj_in = next((k for k in sorted(s) if k.endswith(".proj_in.weight")), None)
    if proj_in is None:
        raise ModelLoadError(
            f"{what}: attention layers without an input projection (proj_in); not understood"
        )
    mid_depth = len(_indices(s, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    return {
        "in_channels": conv_in[1],
        "model_channels": conv_in[0],
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "attention": attention,
        "depths": depths,
        "mid_depth": mid_depth,
        "cross_attention_dim": s[attn_keys[0]][1],
        "use_linear_projection": len(s[proj_in]) == 2,
        "time_embed_dim": _shape(s, "time_embed.0.weight", what)[0],
        "label_emb": s.get("label_emb.0.0.weight"),
    }


def _heads(levels: dict[str, Any], rule: Mapping[str, int], what: str) -> int | list[int]:
    """UNet heads by the family rule: a fixed count (SD 1.x) or channels / head width."""
    if "heads" in rule:
        return int(rule["heads"])
    width = int(rule["head_width"])
    for channels, has_attention in zip(levels["block_out_channels"], levels["attention"], strict=True):
        if has_attention and channels % width:
            raise ModelLoadError(
                f"{what}: {channels} attention channels are not a multiple of the "
                f"family's {width}-channel heads"
            )
    return [max(1, c // width) for c in levels["block_out_channels"]]


def _transformer_layers(levels: dict[str, Any], what: str) -> int | list[int]:
    """Transformer depth per level (one number when all attention levels and the middle agree);
    levels without attention ignore the value, and diffusers' middle block uses the last level's."""
    mid = levels["mid_depth"] or 1
    used = {d for d, a in zip(levels["depths"], levels["attention"], strict=True) if a} | {mid}
    if len(used) == 1:
        return used.pop()
    depths = [d if a else 1 for d, a in zip(levels["depths"], levels["attention"], strict=True)]
    if mid != depths[-1]:
        if levels["attention"][-1]:
            raise ModelLoadError(
                f"{what}: the middle block's transformer depth ({mid}) differs from the "
                f"last level's ({depths[-1]}), which diffusers cannot express"
            )
        depths[-1] = mid
    return depths


def _down_config(levels: dict[str, Any], heads: Mapping[str, int], what: str) -> dict[str, Any]:
    down_types = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels["attention"]]
    config: dict[str, Any] = {
        "in_channels": levels["in_channels"],
        "block_out_channels": levels["block_out_channels"],
        "down_block_types": down_types,
        "layers_per_block": levels["layers_per_block"],
        "cross_attention_dim": levels["cross_attention_dim"],
        "use_linear_projection": levels["use_linear_projection"],
        "attention_head_dim": _heads(levels, heads, what),
        "transformer_layers_per_block": _transformer_layers(levels, what),
    }
    if levels["time_embed_dim"] != 4 * levels["model_channels"]:
        config["time_embedding_dim"] = levels["time_embed_dim"]
    return config


def _addition(
    levels: dict[str, Any], pooled_dim: int | None, time_ids: int | None, what: str
) -> dict[str, Any]:
    """SDXL's ``text_time`` addition embedding (pooled text + time ids) from ``label_emb``."""
    label = levels["label_emb"]
    if label is None:
        return {
            "addition_embed_type": None,
            "addition_time_embed_dim": None,
            "projection_class_embeddings_input_dim": None,
        }
    if pooled_dim is None or not time_ids:
        raise ModelLoadError(
            f"{what}: the UNet has a class/addition embedding (label_emb) but the family "
            "has no pooled text embedding; this kind of model is not supported"
        )
    extra = label[1] - pooled_dim
    if extra <= 0 or extra % time_ids:
        raise ModelLoadError(
            f"{what}: the addition embedding takes {label[1]} features, which is not "
            f"{pooled_dim} pooled + {time_ids} time ids of equal width"
        )
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": extra // time_ids,
        "projection_class_embeddings_input_dim": label[1],
    }


def unet_config(
    shapes: Shapes,
    base: Mapping[str, Any],
    heads: Mapping[str, int],
    *,
    sample_size: int,
    pooled_dim: int | None = None,
    time_ids: int | None = None,
    prefix: str = UNET_PREFIX,
) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config: ``base`` (the family's) with the checkpoint's dimensions."""
    what = "UNet"
    s = strip_prefix(shapes, prefix)
    levels = _down_levels(s, what)
    n_out = len(_indices(s, r"output_blocks\.(\d+)\."))
    if n_out != len(levels["block_out_channels"]) * (levels["layers_per_block"] + 1):
        raise ModelLoadError(f"{what}: {n_out} output blocks do not mirror the input blocks")
    config = dict(base)
    config.update(_down_config(levels, heads, what))
    config.update(_addition(levels, pooled_dim, time_ids, what))
    config["up_block_types"] = [
        "CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D"
        for t in reversed(config["down_block_types"])
    ]
    config["out_channels"] = _shape(s, "out.2.weight", what)[0]
    config["sample_size"] = sample_size
    return config


def controlnet_layout(shapes: Shapes) -> str | None:
    """The prefix of an original-layout ControlNet's weights (``"control_model."`` or ``""``), or
    None when ``shapes`` is not one."""
    for prefix in (CONTROLNET_PREFIX, ""):
        if f"{prefix}input_hint_block.0.weight" in shapes and f"{prefix}zero_convs.0.0.weight" in shapes:
            return prefix
    return None


def controlnet_config(
    shapes: Shapes, base: Mapping[str, Any], heads: Mapping[str, int], *, prefix: str = CONTROLNET_PREFIX
) -> dict[str, Any]:
    """A ``ControlNetModel`` config read from an original-layout ControlNet. ``base``/``heads`` are
    the settings of the family it belongs to (told by its cross-attention width)."""
    what = "ControlNet"
    s = strip_prefix(shapes, prefix)
    levels = _down_levels(s, what)
    config = {
        k: base[k]
        for k in (
            "act_fn",
            "flip_sin_to_cos",
            "freq_shift",
            "norm_eps",
            "norm_num_groups",
            "downsample_padding",
            "mid_block_scale_factor",
            "upcast_attention",
        )
        if k in base
    }
    config.update(_down_config(levels, heads, what))
    label = levels["label_emb"]
    if label is not None:  # SDXL ControlNets: the family's time-id width, the rest from the weights
        config.update(
            {
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": int(base.get("addition_time_embed_dim") or 256),
                "projection_class_embeddings_input_dim": label[1],
            }
        )
    hint = hint_convs(s)
    outs = [s[f"input_hint_block.{i}.weight"][0] for i in hint[:-1]]
    config["conditioning_channels"] = s[f"input_hint_block.{hint[0]}.weight"][1]
    config["conditioning_embedding_out_channels"] = [outs[0], *outs[2::2]]
    if len(outs) % 2 == 0:
        raise ModelLoadError(
            f"{what}: the hint block has {len(hint)} convolutions, not the "
            "conv / (conv, strided conv)... / zero conv pattern"
        )
    return config


def hint_convs(s: Shapes) -> list[int]:
    """Indices of the convolutions of a ControlNet's ``input_hint_block`` (the last is its output)."""
    indices = _indices(s, r"input_hint_block\.(\d+)\.weight$")
    if len(indices) < 2:
        raise ModelLoadError("ControlNet: the hint block (input_hint_block) has fewer than two convolutions")
    return indices


# -- VAE ----------------------------------------------------------------------------------------


def vae_config(
    shapes: Shapes, base: Mapping[str, Any], *, sample_size: int, prefix: str = VAE_PREFIX
) -> dict[str, Any]:
    """An ``AutoencoderKL`` config: ``base`` with the checkpoint's channels, levels and latent size."""
    what = "VAE"
    s = strip_prefix(shapes, prefix)
    conv_in = _shape(s, "encoder.conv_in.weight", what)
    levels = _indices(s, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    if levels != list(range(len(levels))) or not levels:
        raise ModelLoadError(f"{what}: encoder levels {levels} are not understood")
    channels = [_shape(s, f"encoder.down.{i}.block.0.conv2.weight", what)[0] for i in levels]
    per_level = len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight"))
    latent = _shape(s, "decoder.conv_in.weight", what)[1]
    if _shape(s, "encoder.conv_out.weight", what)[0] != 2 * latent:
        raise ModelLoadError(f"{what}: the encoder's output is not a mean and variance of {latent} channels")
    config = dict(base)
    config.update(
        {
            "in_channels": conv_in[1],
            "out_channels": _shape(s, "decoder.conv_out.weight", what)[0],
            "block_out_channels": channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels),
            "layers_per_block": per_level,
            "latent_channels": latent,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in s,
            "sample_size": sample_size,
        }
    )
    return config


# -- text encoders ------------------------------------------------------------------------------


def clip_keys(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    """A Hugging Face-layout CLIP text model under ``prefix``, keyed without ``text_model.``."""
    return {k.removeprefix("text_model."): v for k, v in strip_prefix(shapes, prefix).items()}


def text_encoder_config(shapes: Shapes, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A ``CLIPTextConfig`` dict for the encoder ``spec`` describes (``layout`` "clip" or "open_clip",
    ``prefix``, ``head_width``, ``skip_last_layer``, base ``config``), sized from the checkpoint."""
    prefix, what = spec["prefix"], f"text encoder ({spec['prefix']}*)"
    if spec["layout"] == "clip":
        s = clip_keys(shapes, prefix)
        vocab, width = _shape(s, "embeddings.token_embedding.weight", what)
        positions = _shape(s, "embeddings.position_embedding.weight", what)[0]
        layers = len(_indices(s, r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight"))
        inner = _shape(s, "encoder.layers.0.mlp.fc1.weight", what)[0]
        projection = s.get("text_projection.weight", (None,))[0]
    else:
        s = strip_prefix(shapes, prefix)
        vocab, width = _shape(s, "token_embedding.weight", what)
        positions = _shape(s, "positional_embedding", what)[0]
        layers = len(_indices(s, r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"))
        layers -= 1 if spec.get("skip_last_layer") else 0
        inner = _shape(s, "transformer.resblocks.0.mlp.c_fc.weight", what)[0]
        projection = s.get("text_projection", (None, None))[1]
    head_width = int(spec["head_width"])
    if width % head_width or layers < 1:
        raise ModelLoadError(
            f"{what}: width {width} with {layers} layers does not fit the family's "
            f"{head_width}-channel attention heads"
        )
    config = dict(spec["config"])
    config.update(
        {
            "vocab_size": vocab,
            "hidden_size": width,
            "intermediate_size": inner,
            "num_hidden_layers": layers,
            "num_attention_heads": width // head_width,
            "max_position_embeddings": positions,
        }
    )
    if spec["class"] == "CLIPTextModelWithProjection":
        if projection is None:
            raise ModelLoadError(f"{what}: the text projection is missing")
        config["projection_dim"] = projection
    return config


def pooled_width(shapes: Shapes, spec: Mapping[str, Any]) -> int | None:
    """The pooled (projected) embedding width of a text encoder with a projection, else None."""
    if spec["class"] != "CLIPTextModelWithProjection":
        return None
    return int(text_encoder_config(shapes, spec)["projection_dim"])
