"""Separate VAEs: loading a VAE file for a request, and decoding that never hands out NaN.

Users keep VAEs as single files (``models/vae/*.safetensors``) in the original (LDM) layout that
A1111 and ComfyUI read, or as diffusers folders. A request names one (``GenerationRequest.vae``)
and gets a copy of its model bundle with that VAE; the cached bundle itself is never changed, so
the next request, or another user's, still sees the model's own VAE.

The latent scaling (``scaling_factor``, SDXL's 0.13025 against SD's 0.18215, and any
``latents_mean``/``latents_std``/``shift_factor``) belongs to the diffusion model, not to the VAE
file: a swapped VAE decodes with the model's own values, as in A1111.

fp16 VAEs (SDXL's above all) can overflow and decode to NaN, which shows as a black image.
:func:`decode_checked` sees non-finite pixels, decodes again with a float32 copy of the VAE and
says so, so the user never gets a black image without a word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from webui.errors import GenerationError, ModelLoadError

LATENT_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
AUTOMATIC = ("", "automatic", "none")
_LDM_PREFIXES = ("first_stage_model.", "vae.")


def is_automatic(name: str | None) -> bool:
    """True when ``name`` means "the model's own VAE" (None, "", "Automatic", "None")."""
    return name is None or name.strip().lower() in AUTOMATIC


def latent_scaling(vae_config: Any) -> dict[str, Any]:
    """The latent-scaling entries of a VAE config (missing ones as None)."""
    return {key: getattr(vae_config, key, None) for key in LATENT_KEYS}


# -- reading VAE weights -----------------------------------------------------------------------


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAE weights without a checkpoint's ``first_stage_model.`` (or ``vae.``) prefix, so that a
    whole SD checkpoint's VAE part and a bare VAE file read alike."""
    for prefix in _LDM_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
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
        raise ModelLoadError("these weights are not a VAE in the original layout (no encoder/decoder conv_in/out)")
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
    vae = AutoencoderKL(**config)
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
            raise ModelLoadError(f"could not load the VAE folder {path.name}: {str(exc).splitlines()[0]}") from exc
    else:
        state = load_state_dict(path, allow_pickle=allow_pickle)
        vae = vae_from_state_dict(state, name=path.name)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -- decoding that recovers from NaN ---------------------------------------------------------------


def decode_checked(decode: Any, bundle: Any, latents: torch.Tensor, notes: dict[str, Any]) -> torch.Tensor:
    """``decode(bundle, latents)``; if that gives NaN or inf in a half-precision VAE, decode again
    with a float32 copy of it and record ``"VAE decode": "float32 (NaN in float16)"`` in ``notes``.

    The float32 copy lives only for this call: memory is given back at once. A float32 VAE that
    still gives non-finite pixels is an error with a clear message, never a black image.
    """
    pixels = decode(bundle, latents)
    if bool(torch.isfinite(pixels).all()):
        return pixels
    vae = bundle.vae
    dtype = getattr(vae, "dtype", torch.float32)
    if dtype == torch.float32:
        raise GenerationError(
            "the VAE decoded to NaN/inf even in float32: the latents are broken "
            "(try another sampler, fewer steps or a lower CFG scale)"
        )
    upcast = _float32_copy(vae, latents.device)
    try:
        pixels = decode(_with_vae(bundle, upcast), latents.float())
    finally:
        del upcast
    if not bool(torch.isfinite(pixels).all()):
        raise GenerationError("the VAE decoded to NaN/inf in float16 and again in float32: the latents are broken")
    notes["VAE decode"] = f"float32 (NaN in {str(dtype).removeprefix('torch.')})"
    return pixels


def _float32_copy(vae: Any, device: torch.device) -> Any:
    """A float32 copy of ``vae`` on ``device``, built fresh from its config and weights: none of the
    original's hooks (CPU offload moves the original, not a copy), with its slicing and tiling."""
    state = {key: value.detach().to(device=device, dtype=torch.float32) for key, value in vae.state_dict().items()}
    with torch.device("meta"):
        upcast = type(vae).from_config(vae.config)
    upcast.load_state_dict(state, assign=True)
    for flag in ("use_slicing", "use_tiling"):
        if hasattr(vae, flag):
            setattr(upcast, flag, getattr(vae, flag))
    return upcast.eval()


def _with_vae(bundle: Any, vae: Any) -> Any:
    import dataclasses

    return dataclasses.replace(bundle, vae=vae)
