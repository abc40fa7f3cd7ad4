"""The latent codec: between pixels and the latents the denoising loop holds, written once.

A VAE encodes an image to *raw* latents; the loop works on *scaled* ones. How they are scaled
belongs to the diffusion model: SD 1.x/2.x multiply by 0.18215, SDXL by 0.13025, SD3/Flux-style
VAEs first subtract a ``shift_factor``, and some VAEs normalise each channel with
``latents_mean``/``latents_std``. Every road between the two goes through here, so that rule
lives in one place:

* the engine's encoding (img2img, inpainting) and decoding: :func:`encode`, :func:`decode`;
* the live previews, which fit their colour map on scaled latents: :func:`scale_latents`;
* the NaN recovery of half-precision VAEs, which decodes again with a float32 copy:
  :func:`decode_checked`, :func:`float32_vae`.

The scaling is read from the VAE config (:func:`latent_scaling`) as a plain dict; a bundle whose
VAE was swapped for another file keeps the model's own (``ModelBundle.latent_scaling``, see
:func:`model_scaling`), as A1111 does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from webui.errors import GenerationError

if TYPE_CHECKING:
    from webui.engine.bundle import ModelBundle

__all__ = [
    "LATENT_KEYS",
    "decode",
    "decode_checked",
    "encode",
    "float32_vae",
    "latent_scaling",
    "model_scaling",
    "scale_latents",
    "unscale_latents",
]

LATENT_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
_DECODER_KEYS = ("decoder.", "post_quant_conv.")


def latent_scaling(vae_config: Any) -> dict[str, Any]:
    """The latent-scaling entries of a VAE config (missing ones as None)."""
    return {key: getattr(vae_config, key, None) for key in LATENT_KEYS}


def model_scaling(bundle: ModelBundle) -> dict[str, Any]:
    """The model's latent scaling: its own VAE's, also when another VAE was swapped in."""
    return bundle.latent_scaling if bundle.latent_scaling is not None else latent_scaling(bundle.vae.config)


def _statistics(scaling: Mapping[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-channel ``latents_mean`` and ``latents_std`` as (1, C, 1, 1) tensors like ``like``,
    or None when the scaling has not both."""
    mean, std = scaling.get("latents_mean"), scaling.get("latents_std")
    if mean is None or std is None:
        return None
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


def scale_latents(raw: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """Raw VAE latents to the loop's latents: ``(raw - mean) * factor / std`` with per-channel
    statistics, else ``(raw - shift) * factor``. The inverse of :func:`unscale_latents`."""
    factor = scaling["scaling_factor"]
    statistics = _statistics(scaling, raw)
    if statistics is not None:  # as diffusers' SDXL img2img
        mean, std = statistics
        return (raw - mean) * factor / std
    return (raw - (scaling.get("shift_factor") or 0.0)) * factor


def unscale_latents(latents: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """The loop's latents back to raw VAE latents (what the VAE decoder takes)."""
    factor = scaling["scaling_factor"]
    statistics = _statistics(scaling, latents)
    if statistics is not None:
        mean, std = statistics
        return latents * std / factor + mean
    return latents / factor + (scaling.get("shift_factor") or 0.0)


@torch.inference_mode()
def encode(bundle: ModelBundle, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Encode (1 or B, 3, H, W) images in [-1, 1] to the loop's latents in the bundle's dtype,
    sampling each image of the batch with its own generator (so image k depends on seed k only)."""
    vae = bundle.vae
    images = images.to(device=bundle.device, dtype=vae.dtype)
    if images.shape[0] == 1 and len(generators) > 1:
        images = images.repeat(len(generators), 1, 1, 1)
    raw = torch.cat(
        [vae.encode(images[k : k + 1]).latent_dist.sample(generators[k]) for k in range(images.shape[0])]
    )
    return scale_latents(raw, model_scaling(bundle)).to(bundle.dtype)


@torch.inference_mode()
def decode(bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
    """The loop's latents to float32 pixels in [-1, 1] (not clamped), through the bundle's VAE."""
    vae = bundle.vae
    raw = unscale_latents(latents, model_scaling(bundle))
    return vae.decode(raw.to(vae.dtype), return_dict=False)[0].float()


def float32_vae(vae: Any, device: torch.device | str, *, encoder_only: bool = False) -> Any:
    """``vae`` itself when it is already float32 on ``device``, else a float32 copy of it there.

    The copy is built fresh from the config and weights, so it has none of the original's hooks
    (CPU offload moves the original, not a copy); a full copy keeps the original's slicing and
    tiling. ``encoder_only`` copies only the encoder half (for a one-off fit; decoding with it is
    not possible). The original is never changed.
    """
    device = torch.device(device)
    first = next(vae.parameters())
    if first.dtype == torch.float32 and first.device == device:
        return vae
    state = {
        key: value.detach().to(device=device, dtype=torch.float32)
        for key, value in vae.state_dict().items()
        if not (encoder_only and key.startswith(_DECODER_KEYS))
    }
    with torch.device("meta"):
        copy = type(vae).from_config(vae.config)
    copy.load_state_dict(state, strict=not encoder_only, assign=True)
    if not encoder_only:
        for flag in ("use_slicing", "use_tiling"):
            if hasattr(vae, flag):
                setattr(copy, flag, getattr(vae, flag))
    return copy.eval()


def decode_checked(
    decode: Callable[[Any, torch.Tensor], torch.Tensor],
    bundle: Any,
    latents: torch.Tensor,
    notes: dict[str, Any],
) -> torch.Tensor:
    """``decode(bundle, latents)``; if that gives NaN or inf in a half-precision VAE, decode again
    with a float32 copy of it and record ``"VAE decode": "float32 (NaN in float16)"`` in ``notes``.

    fp16 VAEs (SDXL's above all) can overflow, which would show as a black image. The float32 copy
    lives only for this call: memory is given back at once. A float32 VAE that still gives
    non-finite pixels is an error with a clear message, never a black image.
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
    upcast = float32_vae(vae, latents.device)
    try:
        pixels = decode(dataclasses.replace(bundle, vae=upcast), latents.float())
    finally:
        del upcast
    if not bool(torch.isfinite(pixels).all()):
        raise GenerationError(
            "the VAE decoded to NaN/inf in float16 and again in float32: the latents are broken"
        )
    notes["VAE decode"] = f"float32 (NaN in {str(dtype).removeprefix('torch.')})"
    return pixels
