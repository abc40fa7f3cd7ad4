"""Original-layout ("single-file") Stable Diffusion checkpoints and ControlNets, loaded offline.

The ``.safetensors`` files made for AUTOMATIC1111 and ComfyUI hold one model in the layout of the
original latent-diffusion code (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*`` / ``conditioner.embedders.*``) with no configuration. This module

1. tells the family from the tensor names and shapes, reading only the file's header
   (:func:`inspect_file`, :func:`detect_checkpoint`);
2. synthesises the diffusers configurations from the family's shipped settings and the weights'
   own dimensions (:mod:`webui.engine.ldm_layout`), builds the CLIP tokenizers from the shipped BPE
   merges (:mod:`webui.engine.clip_tokenizer`), and renames the weights with diffusers' converters
   (``diffusers.loaders.single_file_utils``) — nothing is fetched from a hub;
3. returns an ordinary :class:`~webui.engine.bundle.ModelBundle`, so the engine generates with it as
   with any diffusers folder.

Families: ``sd1`` (CLIP ViT-L text encoder, cross-attention 768), ``sd2`` (OpenCLIP ViT-H, 1024),
``sdxl`` (both encoders, 2048, plus a pooled/time-id addition embedding) and the SDXL refiner (OpenCLIP
bigG alone, 1280). A UNet taking ``2 * latent + 1`` input channels is the family's inpainting model.

**Prediction type** (noise or v; the weights cannot tell), first match wins:

1. the file's ``__metadata__["modelspec.prediction_type"]`` ("epsilon" or "v"/"v_prediction");
2. a sidecar ``<name>.yaml`` next to the file (AUTOMATIC1111's convention):
   ``model.params.parameterization: "v"`` means v-prediction, any other value or none means epsilon
   (the original code's default), so the sidecar can force either;
3. the family default: SD 2.x base models are v-prediction (the 768-pixel 2.0-v/2.1 models, the
   ones most used), SD 2.x inpainting is epsilon, SD 1.x and SDXL are epsilon. An SD 2.x
   512-pixel epsilon model (2.0-base/2.1-base) therefore needs its metadata or a sidecar yaml (A1111's
   ``v2-inference.yaml``, which has no ``parameterization``).

**Native size**: ``modelspec.resolution`` when the metadata has it, else 512 (SD 1.x, SD 2.x
epsilon), 768 (SD 2.x v-prediction) or 1024 (SDXL).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from webui.engine.bundle import ModelBundle
from webui.engine.clip_tokenizer import VOCAB_SIZE, clip_tokenizer
from webui.engine.files import SAFETENSORS_SUFFIX, load_state_dict, read_shapes
from webui.engine.ldm_layout import (
    CONTROLNET_CONV_OUT,
    UNET_PREFIX,
    VAE_PREFIX,
    Shapes,
    clip_keys,
    controlnet_config,
    controlnet_layout,
    family_config,
    hint_convs,
    pooled_width,
    strip_prefix,
    text_encoder_config,
    unet_config,
    vae_config,
)
from webui.errors import ModelLoadError

PREDICTION_TYPES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
    "v-prediction": "v_prediction",
}
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT_0_CLIP = "conditioner.embedders.0.transformer."
SDXL_TEXT_0_OPEN = "conditioner.embedders.0.model."
SDXL_TEXT_1_OPEN = "conditioner.embedders.1.model."


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint is, as far as its header tells.

    ``family`` is the engine's family ("sd1", "sd2", "sdxl"); ``variant`` is "base", "inpainting" or
    "refiner"; ``config_name`` names the shipped settings used (``webui/configs/<name>.json``).
    ``prediction_source`` says where the prediction type came from: "metadata", "sidecar" or
    "default".
    """

    family: str
    variant: str
    config_name: str
    prediction_type: str
    prediction_source: str
    default_size: int
    in_channels: int
    cross_attention_dim: int

    @property
    def label(self) -> str:
        """``"sd1"``, ``"sd1-inpainting"``, ``"sd2-v"``, ``"sdxl-refiner"``..."""
        label = self.family if self.variant == "base" else f"{self.family}-{self.variant}"
        return f"{label}-v" if self.prediction_type == "v_prediction" else label


def sidecar_yaml(path: str | Path) -> Path | None:
    """``<name>.yaml`` next to the checkpoint, if there is one."""
    candidate = Path(path).with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def inspect_file(path: str | Path, *, allow_pickle: bool = False) -> CheckpointInfo:
    """Detect the family of a checkpoint file from its safetensors header (no tensor is read) and its
    sidecar yaml."""
    path = Path(path)
    shapes, metadata = read_shapes(path, allow_pickle=allow_pickle)
    return detect_checkpoint(shapes, metadata, sidecar=sidecar_yaml(path), name=path.name)


def detect_checkpoint(
    shapes: Shapes,
    metadata: Mapping[str, str] | None = None,
    *,
    sidecar: Path | None = None,
    name: str = "the checkpoint",
) -> CheckpointInfo:
    """The family, variant and prediction type of an original-layout checkpoint, from tensor names and
    shapes. Raises :class:`ModelLoadError` naming what was found when the layout is not one of the
    supported families."""
    metadata = metadata or {}
    unet = strip_prefix(shapes, UNET_PREFIX)
    if "input_blocks.0.0.weight" not in unet:
        raise ModelLoadError(f"{name} is not a Stable Diffusion checkpoint: {describe_layout(shapes)}")
    if f"{VAE_PREFIX}decoder.conv_in.weight" not in shapes:
        raise ModelLoadError(f"{name} has a UNet but no VAE ({VAE_PREFIX}*): {describe_layout(shapes)}")
    config_name, widths = _text_layout(shapes, name)
    cross = next((v[1] for k, v in sorted(unet.items()) if k.endswith("attn2.to_k.weight")), None)
    if cross != sum(widths):
        raise ModelLoadError(
            f"{name}: the UNet's cross-attention takes {cross} features but its text encoder{'s' * (len(widths) > 1)} "
            f"give{'s' * (len(widths) == 1)} {' + '.join(map(str, widths))}; the layout is not understood"
        )
    latent = shapes[f"{VAE_PREFIX}decoder.conv_in.weight"][1]
    in_channels = unet["input_blocks.0.0.weight"][1]
    if in_channels == latent:
        variant = "base"
    elif in_channels == 2 * latent + 1:
        variant = "inpainting"
    else:
        raise ModelLoadError(
            f"{name}: the UNet takes {in_channels} input channels (expected {latent}, or {2 * latent + 1} for "
            "inpainting); models such as instruct-pix2pix (8) or the x4 upscaler (7) are not supported"
        )
    if config_name == "sdxl-refiner":
        if variant != "base":
            raise ModelLoadError(f"{name}: an SDXL refiner with an inpainting UNet is not supported")
        variant = "refiner"
    config = family_config(config_name)
    prediction, source = _prediction_type(config, variant, metadata, sidecar, name)
    size = _native_size(config, prediction, metadata)
    return CheckpointInfo(
        config["family"], variant, config_name, prediction, source, size, in_channels, cross
    )


def _text_layout(shapes: Shapes, name: str) -> tuple[str, list[int]]:
    """Which family's text encoders the file holds, and their widths."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    def clip_width(prefix: str) -> int:
        return clip_keys(shapes, prefix).get("embeddings.token_embedding.weight", (0, 0))[1]

    def open_width(prefix: str) -> int:
        return shapes.get(f"{prefix}token_embedding.weight", (0, 0))[1]

    if has(SDXL_TEXT_0_CLIP) and has(SDXL_TEXT_1_OPEN):
        return "sdxl", [clip_width(SDXL_TEXT_0_CLIP), open_width(SDXL_TEXT_1_OPEN)]
    if has(SDXL_TEXT_0_OPEN) and not has("conditioner.embedders.1."):
        return "sdxl-refiner", [open_width(SDXL_TEXT_0_OPEN)]
    if has(SD2_TEXT):
        return "sd2", [open_width(SD2_TEXT)]
    if has(SD1_TEXT):
        return "sd1", [clip_width(SD1_TEXT)]
    raise ModelLoadError(
        f"{name} has a UNet and a VAE but no text encoder of a known layout "
        f"(cond_stage_model.transformer / cond_stage_model.model / conditioner.embedders): {describe_layout(shapes)}"
    )


def _prediction_type(
    config: Mapping[str, Any], variant: str, metadata: Mapping[str, str], sidecar: Path | None, name: str
) -> tuple[str, str]:
    declared = metadata.get("modelspec.prediction_type")
    if declared:
        value = PREDICTION_TYPES.get(declared.strip().lower())
        if value is None:
            raise ModelLoadError(
                f"{name}: its metadata names prediction type {declared!r}; only epsilon and v are supported"
            )
        return value, "metadata"
    if sidecar is not None:
        return _sidecar_prediction(sidecar), "sidecar"
    default = config.get(variant, {}).get("prediction_type") or config["prediction_type"]
    return default, "default"


def _sidecar_prediction(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"cannot read the sidecar config {path.name}: {exc}") from exc
    model = data.get("model") if isinstance(data, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    value = params.get("parameterization") if isinstance(params, dict) else None
    if value is None and isinstance(data, dict):
        value = data.get("parameterization")
    return "v_prediction" if str(value).strip().lower() == "v" else "epsilon"


def _native_size(config: Mapping[str, Any], prediction: str, metadata: Mapping[str, str]) -> int:
    resolution = metadata.get("modelspec.resolution", "")
    parts = resolution.lower().replace(" ", "").split("x")
    if len(parts) == 2 and all(p.isdigit() and 0 < int(p) <= 16384 for p in parts):
        return max(int(p) for p in parts)
    if prediction == "v_prediction" and "v_prediction" in config:
        return int(config["v_prediction"].get("default_size", config["default_size"]))
    return int(config["default_size"])


def describe_layout(shapes: Shapes) -> str:
    """A one-line summary of what a state dict holds: its main key prefixes and a guess at what kind
    of file it is when it is not a full checkpoint."""
    groups: Counter[str] = Counter()
    for key in shapes:
        parts = key.split(".")
        if parts[0].startswith("lora_"):
            groups["lora_*"] += 1
        elif parts[0] in {"model", "cond_stage_model", "conditioner", "control_model"} and len(parts) > 2:
            groups[".".join(parts[: 2 if parts[0] != "conditioner" else 3])] += 1
        else:
            groups[parts[0]] += 1
    found = ", ".join(f"{prefix}.* ({count})" for prefix, count in groups.most_common(6)) or "no tensors"
    if len(groups) > 6:
        found += f" and {len(groups) - 6} more groups"
    hint = ""
    if controlnet_layout(shapes) is not None:
        hint = " It looks like a ControlNet: choose it as the ControlNet, not as the model."
    elif any("lora" in k.lower() for k in list(shapes)[:200]):
        hint = " It looks like a LoRA, which needs a base model and is not a model by itself."
    elif "encoder.conv_in.weight" in shapes and "decoder.conv_in.weight" in shapes:
        hint = " It looks like a standalone VAE, not a whole model."
    elif "conv_in.weight" in shapes and any(k.startswith("down_blocks.") for k in shapes):
        hint = " It looks like one component of a diffusers folder: load the whole folder instead."
    return f"found {found}.{hint}"


# -- loading ------------------------------------------------------------------------------------


def load_single_file(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> ModelBundle:
    """Load an original-layout checkpoint file as a :class:`ModelBundle` (offline).

    The SDXL refiner loads as a model of its own (one text encoder, aesthetic-score time ids), best
    used in img2img on an SDXL base model's image at a low strength, as diffusers' refiner pipeline.
    """
    path = Path(path)
    state, shapes, metadata = _read(path, allow_pickle)
    info = detect_checkpoint(shapes, metadata, sidecar=sidecar_yaml(path), name=path.name)
    if state is None:
        state = load_state_dict(path, allow_pickle=allow_pickle)
    bundle = convert_checkpoint(state, info, name=path.stem, dtype=dtype)
    bundle.source = str(path)  # the model manager adds the file's hash (A1111's "Model hash")
    for module in bundle.modules():
        module.to(device)
    return bundle


def _read(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor] | None, Shapes, dict[str, str]]:
    """``(state, shapes, metadata)``: a safetensors file's header only (``state`` None, the tensors
    are read after detection); a pickle's whole state, since it has no header to read alone."""
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        shapes, metadata = read_shapes(path)
        return None, shapes, metadata
    state = load_state_dict(path, allow_pickle=allow_pickle)
    return state, {k: tuple(v.shape) for k, v in state.items()}, {}


def component_configs(shapes: Shapes, info: CheckpointInfo) -> dict[str, Any]:
    """The diffusers configurations of a checkpoint's components, from its shapes alone:
    ``{"unet": ..., "vae": ..., "text_encoders": [CLIPTextConfig dicts]}``."""
    config = family_config(info.config_name)
    base_unet = dict(config["unet"])
    if info.prediction_type == "v_prediction":
        base_unet.update(config.get("v_prediction", {}).get("unet", {}))
    vae_cfg = vae_config(shapes, config["vae"], sample_size=info.default_size)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    specs = config["text_encoders"]
    unet_cfg = unet_config(
        shapes,
        base_unet,
        config["unet_heads"],
        sample_size=info.default_size // vae_factor,
        pooled_dim=pooled_width(shapes, specs[-1]),
        time_ids=config.get("time_ids"),
    )
    return {
        "unet": unet_cfg,
        "vae": vae_cfg,
        "text_encoders": [text_encoder_config(shapes, s) for s in specs],
    }


def convert_checkpoint(
    state: Mapping[str, torch.Tensor],
    info: CheckpointInfo,
    *,
    name: str = "checkpoint",
    dtype: torch.dtype = torch.float32,
) -> ModelBundle:
    """Build the diffusers components of an original-layout state dict described by ``info``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    config = family_config(info.config_name)
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    configs = component_configs(shapes, info)
    unet_cfg, vae_cfg, specs = configs["unet"], configs["vae"], config["text_encoders"]
    state = dict(state)
    unet = _adopt(
        _empty(lambda: UNet2DConditionModel.from_config(unet_cfg)),
        convert_ldm_unet_checkpoint(state, unet_cfg),
        dtype,
        "UNet",
    )
    vae = _adopt(
        _empty(lambda: AutoencoderKL.from_config(vae_cfg)),
        convert_ldm_vae_checkpoint(state, vae_cfg),
        dtype,
        "VAE",
    )
    encoders = [_text_encoder(state, shapes, spec, dtype) for spec in specs]
    tokenizers = [
        clip_tokenizer(pad_token=tok["pad_token"], model_max_length=int(enc.config.max_position_embeddings))
        for tok, enc in zip(config["tokenizers"], encoders, strict=True)
    ]
    settings = {k: v for k, v in config.get("model_index", {}).items() if not k.startswith("_")}
    settings.update(
        {
            "default_size": info.default_size,
            "prediction_type": info.prediction_type,
            "checkpoint_type": info.label,
            "variant": info.variant,
        }
    )
    return ModelBundle(
        name=name,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler_config={**config["scheduler"], "prediction_type": info.prediction_type},
        family=info.family,
        config=settings,
    )


def _text_encoder(
    state: dict[str, torch.Tensor], shapes: Shapes, spec: Mapping[str, Any], dtype: torch.dtype
) -> Any:
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    prefix = spec["prefix"]
    cls = getattr(transformers, spec["class"])
    config = transformers.CLIPTextConfig(**text_encoder_config(shapes, spec))
    if config.vocab_size != VOCAB_SIZE:
        raise ModelLoadError(
            f"text encoder ({prefix}*): its vocabulary has {config.vocab_size} tokens, not the "
            f"{VOCAB_SIZE} of the CLIP tokenizer every Stable Diffusion family uses"
        )
    model = _empty(lambda: cls(config))
    if spec["layout"] == "clip":
        part = {k: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("position_ids")}
        converted = convert_ldm_clip_checkpoint(part, remove_prefix=prefix)
    else:
        kept = config.num_hidden_layers
        part = {
            k: v
            for k, v in state.items()
            if k.startswith(prefix) and _open_clip_kept(k[len(prefix) :], kept, spec)
        }
        converted = convert_open_clip_checkpoint(model, part, prefix=prefix)
    return _adopt(model, _text_keys(model, converted), dtype, f"text encoder ({prefix}*)")


def _open_clip_kept(key: str, layers: int, spec: Mapping[str, Any]) -> bool:
    """OpenCLIP tensors the diffusers text model uses: not the unused last block of SD 2.x (it runs
    the penultimate layer), nor ``logit_scale``, nor the projection of an encoder without one."""
    if key.startswith("transformer.resblocks."):
        return int(key.split(".")[2]) < layers
    if key == "text_projection":
        return spec["class"] == "CLIPTextModelWithProjection"
    return key in {"token_embedding.weight", "positional_embedding"} or key.startswith("ln_final.")


def _text_keys(model: Any, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP keys as ``model`` names them: with ``text_model.`` when it wraps one (the projection
    model; older transformers), without it when it is flat (``CLIPTextModel`` in transformers 5)."""
    bare = {k.removeprefix("text_model."): v for k, v in state.items()}
    if not hasattr(model, "text_model"):
        return bare
    return {k if k.startswith("text_projection") else f"text_model.{k}": v for k, v in bare.items()}


def _empty(factory: Callable[[], Any]) -> Any:
    """A model built without allocating its weights (they are adopted from the checkpoint)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _adopt(model: Any, state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str) -> Any:
    """Give ``model`` exactly the tensors of ``state`` (cast to ``dtype``): every parameter must be
    there, and nothing else."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    absent = sorted(k for k, v in state.items() if v is None)
    if missing or unexpected or absent:
        detail = "; ".join(
            part
            for part in (
                f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                f"{len(absent)} not in the file (e.g. {', '.join(absent[:3])})" if absent else "",
            )
            if part
        )
        raise ModelLoadError(
            f"{what}: the checkpoint does not match the configuration read from it: {detail}"
        )
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise ModelLoadError(f"{what}: {lines[-1] if lines else exc}") from exc
    return model.eval().requires_grad_(False)


# -- ControlNets --------------------------------------------------------------------------------


def load_single_file_controlnet(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> Any:
    """Load an original-layout ControlNet file (``control_model.*``, e.g. ``control_v11p_sd15_seg``)
    as a diffusers ``ControlNetModel``. Files that also carry a whole SD model only have their
    ControlNet tensors read."""
    path = Path(path)
    state, shapes, _ = _read(path, allow_pickle)
    prefix = controlnet_layout(shapes)
    if prefix is None:
        raise ModelLoadError(
            f"{path.name} is not a ControlNet in the original layout "
            f"(control_model.input_hint_block...): {describe_layout(shapes)}"
        )
    if state is None:
        state = load_state_dict(path, keys=[k for k in shapes if k.startswith(prefix)])
    return convert_controlnet(state, prefix=prefix, name=path.name, dtype=dtype).to(device)


def convert_controlnet(
    state: Mapping[str, torch.Tensor],
    *,
    prefix: str = "control_model.",
    name: str = "ControlNet",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Build a ``ControlNetModel`` from original-layout ControlNet tensors (under ``prefix``)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    s = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    shapes = {k: tuple(v.shape) for k, v in s.items()}
    proj_in = next((v for k, v in sorted(shapes.items()) if k.endswith(".proj_in.weight")), None)
    if proj_in is None:
        raise ModelLoadError(f"{name}: the ControlNet has no attention layers; its layout is not understood")
    # SD 1.x projects into its transformers with 1x1 convolutions, SD 2.x and SDXL with linear layers
    family = "sdxl" if "label_emb.0.0.weight" in shapes else "sd2" if len(proj_in) == 2 else "sd1"
    config = family_config(family)
    cn_config = controlnet_config(shapes, config["unet"], config["unet_heads"], prefix="")
    last = hint_convs(shapes)[-1]
    if last != CONTROLNET_CONV_OUT:  # a shorter hint block: its last conv is still the output conv
        for kind in ("weight", "bias"):
            s[f"input_hint_block.{CONTROLNET_CONV_OUT}.{kind}"] = s.pop(f"input_hint_block.{last}.{kind}")
    converted = convert_controlnet_checkpoint(s, cn_config)
    if "label_emb.0.0.weight" in s:  # diffusers' ControlNet converter leaves SDXL's addition embedding out
        for layer, ldm in (("linear_1", "label_emb.0.0"), ("linear_2", "label_emb.0.2")):
            for kind in ("weight", "bias"):
                converted[f"add_embedding.{layer}.{kind}"] = s[f"{ldm}.{kind}"]
    return _adopt(_empty(lambda: ControlNetModel.from_config(cn_config)), converted, dtype, name)
