"""Separate VAEs: loading a VAE file for a request.

Users keep VAEs as single files (``models/vae/*.safetensors``) in the original (LDM) layout that
A1111 and ComfyUI read, or as diffusers folders. A request names one (``GenerationRequest.vae``)
and gets a copy of its model bundle with that VAE; the cached bundle itself is never changed, so
the next request, or another user's, still sees the model's own VAE.

The latent scaling (SDXL's 0.13025 against SD's 0.18215, and any shift or per-channel
statistics) belongs to the diffusion model, not to the VAE file: a swapped VAE decodes with the
model's own values, as in A1111. The scaling, encoding and decoding, and the float32 retry of a
half-precision VAE that decoded to NaN (:func:`decode_checked`) are the latent codec's
(:mod:`webui.engine.codec`); they are importable from here as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from webui.engine.codec import LATENT_KEYS, decode_checked, latent_scaling
from webui.errors import ModelLoadError

__all__ = [
    "AUTOMATIC",
    "LATENT_KEYS",
    "config_from_ldm",
    "decode_checked",
    "is_automatic",
    "is_ldm_layout",
    "latent_scaling",
    "load_vae",
    "strip_prefix",
    "vae_from_state_dict",
]

AUTOMATIC = ("", "automatic", "none")
_LDM_PREFIXES = ("first_stage_model.", "vae.")


def is_automatic(name: str | None) -> bool:
    """True when ``name`` means "the model's own VAE" (None, "", "Automatic", "None")."""
    return name is None or name.strip().lower() in AUTOMATIC


# -- reading VAE weights -----------------------------------------------------------------------


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAE weights without a checkpoint's ``first_stage_model.`` (or ``vae.``) prefix, so that a
    whole SD checkpoint's VAE part and a bare VAE file read alike."""
    for prefix in _LDM_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def is_ldm_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for the original layout (``encoder.down.0.block.0...``), False for diffusers'
    (``encoder.down_blocks.0.resnets.0...``)."""
    return any(key.startswith("encoder.down.") for key in state)


def config_from_ldm(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An ``AutoencoderKL`` config read from the shapes of LDM-layout VAE weights (levels, blocks,
    channels, latent and image channels), on the settings of SD's VAE for what weights can't show
    (group norms of 32, as in every published SD VAE)."""
    from webui.engine.ldm_layout import family_config, vae_config

    if "encoder.conv_in.weight" not in state or "decoder.conv_out.weight" not in state:
        raise ModelLoadError(
            "these weights are not a VAE in the original layout (no encoder/decoder conv_in/out)"
        )
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    base = family_config("sd1")["vae"]
    config = vae_config(shapes, base, sample_size=base["sample_size"], prefix="")
    config["use_quant_conv"] = "quant_conv.weight" in state
    config["use_post_quant_conv"] = "post_quant_conv.weight" in state
    return config


def vae_from_state_dict(state: dict[str, torch.Tensor], *, name: str = "VAE") -> Any:
    """An ``AutoencoderKL`` from VAE weights in either layout (LDM or diffusers)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = strip_prefix(state)
    if not any(key.startswith(("encoder.", "decoder.")) for key in state):
        raise ModelLoadError(f"{name} is not a VAE: it has no encoder/decoder weights")
    if not is_ldm_layout(state):
        raise ModelLoadError(
            f"{name}: a single-file VAE must be in the original layout (encoder.down.*); "
            "for diffusers-layout weights use a folder with config.json"
        )
    config = config_from_ldm(state)
    converted = convert_ldm_vae_checkpoint(state, config)
    vae: Any = AutoencoderKL(**config)
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{name} does not fit the VAE its shapes describe: "
            f"{len(missing)} missing and {len(unexpected)} unexpected weights "
            f"(first: {(list(missing) + list(unexpected))[0]})"
        )
    return vae.eval()


def load_vae(path: Path, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False) -> Any:
    """A VAE from a diffusers folder (``config.json`` + safetensors) or a single weights file."""
    from diffusers import AutoencoderKL

    from webui.engine.files import load_state_dict

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a VAE folder (no config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the VAE folder {path.name}: {str(exc).splitlines()[0]}"
            ) from exc
    else:
        state = load_state_dict(path, allow_pickle=allow_pickle)
        vae = vae_from_state_dict(state, name=path.name)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
