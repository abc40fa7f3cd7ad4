"""Cheap live previews of latents: a linear latent→RGB map fitted to each model's own VAE.

A full VAE decode every few steps is too slow for a live preview. Instead, :func:`latent_rgb_map`
fits, once per VAE, a linear map from one latent pixel (scaled, as the denoising loop holds it) to
the mean colour of the image patch it covers, by least squares over a small set of solid colours
and colour patterns encoded through that VAE. No coefficient table from elsewhere is needed, so it
works for any model and any number of latent channels. :func:`preview_images` applies it.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from webui.engine.codec import float32_vae, latent_scaling, scale_latents

if TYPE_CHECKING:
    from webui.engine.bundle import ModelBundle

__all__ = ["latent_rgb_map", "preview_images"]

# Fit colours, RGB in [0, 1]: greys, primaries, secondaries and a few in-between tones.
_COLOURS: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 0.0),
    (1.0, 1.0, 1.0),
    (0.5, 0.5, 0.5),
    (0.25, 0.25, 0.25),
    (0.9, 0.15, 0.15),
    (0.15, 0.7, 0.25),
    (0.15, 0.3, 0.9),
    (0.95, 0.85, 0.15),
    (0.15, 0.8, 0.85),
    (0.85, 0.2, 0.8),
    (0.95, 0.55, 0.1),
    (0.55, 0.25, 0.75),
    (0.45, 0.3, 0.15),
    (0.75, 0.9, 0.6),
)
_LATENT_SIDE = 8  # fit images are this many latent pixels wide (and at least 64 pixels)
_RANDOM_IMAGES = 8  # plus this many random mosaics (fixed seed), which fit generated latents better

_maps: weakref.WeakKeyDictionary[Any, tuple[torch.Tensor, torch.Tensor]] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def latent_rgb_map(bundle: ModelBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear map ``rgb = latents · weights + bias`` for ``bundle``'s VAE.

    ``weights`` is (C_latent, 3) and ``bias`` (3,), float32 on the CPU; ``rgb`` is in [-1, 1] (before
    clamping). Fitted on first use and cached per VAE module (thread-safe: concurrent callers wait
    for one fit); treat the returned tensors as read-only.
    """
    vae = bundle.vae
    cached = _maps.get(vae)
    if cached is not None:
        return cached
    with _locks_guard:
        lock = _locks.setdefault(vae, threading.Lock())
    with lock:
        cached = _maps.get(vae)
        if cached is None:
            cached = _fit_map(vae, bundle.vae_scale_factor)
            _maps[vae] = cached
    return cached


@torch.no_grad()
def preview_images(bundle: ModelBundle, latents: torch.Tensor, max_images: int = 4) -> list[Image.Image]:
    """RGB previews of the first ``max_images`` of a (B, C, h, w) scaled latent batch.

    Any dtype or device; the latents are not modified. Each image is (w·f, h·f) pixels, f being
    the VAE's downscale factor (bilinear upscaling of the per-latent-pixel colours).
    """
    if latents.ndim == 3:
        latents = latents.unsqueeze(0)
    if latents.ndim != 4:
        raise ValueError(f"expected (B, C, h, w) latents, got shape {tuple(latents.shape)}")
    if max_images <= 0:
        return []
    weights, bias = latent_rgb_map(bundle)
    if latents.shape[1] != weights.shape[0]:
        raise ValueError(f"latents have {latents.shape[1]} channels, the VAE has {weights.shape[0]}")
    z = latents[:max_images].detach().to(device="cpu", dtype=torch.float32)
    rgb = torch.einsum("bchw,ck->bhwk", z, weights) + bias
    rgb = torch.nan_to_num(rgb, nan=0.0).clamp(-1.0, 1.0)
    pixels = ((rgb + 1.0) * 127.5).round().to(torch.uint8).numpy()
    factor = bundle.vae_scale_factor
    size = (z.shape[3] * factor, z.shape[2] * factor)
    return [Image.fromarray(p).resize(size, Image.Resampling.BILINEAR) for p in pixels]


# -- fitting -------------------------------------------------------------------------------------


def _fit_images(side: int, factor: int) -> torch.Tensor:
    """(N, 3, side, side) images in [-1, 1]: solid colours, then patterns and random mosaics of
    2×2-latent-pixel tiles, all aligned to the latent grid (the same images on every call)."""
    colours = torch.tensor(_COLOURS, dtype=torch.float32)
    solid = colours[:, :, None, None].expand(-1, -1, side, side)
    cells = side // factor
    yy, xx = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")

    def two(mask: torch.Tensor, a: int, b: int) -> torch.Tensor:
        m = mask.float().repeat_interleave(factor, 0).repeat_interleave(factor, 1)
        return colours[a][:, None, None] * m + colours[b][:, None, None] * (1 - m)

    ramp = torch.linspace(0, 1, cells).repeat_interleave(factor)
    patterns = [
        two(xx < cells // 2, 4, 8),  # red | cyan
        two(yy < cells // 2, 6, 7),  # blue / yellow
        two((xx // 2 + yy // 2) % 2 == 0, 1, 0),  # black and white checks
        two((xx - cells // 2) ** 2 + (yy - cells // 2) ** 2 < (cells // 3) ** 2, 10, 5),  # disc
        torch.stack(
            [ramp[None, :].expand(side, -1), ramp[:, None].expand(-1, side), torch.full((side, side), 0.5)]
        ),  # red/green ramps
        torch.stack(
            [
                1 - ramp[:, None].expand(-1, side),
                torch.full((side, side), 0.3),
                ramp[None, :].expand(side, -1),
            ]
        ),  # red/blue ramps
    ]
    tiles = torch.rand(_RANDOM_IMAGES, 3, cells // 2, cells // 2, generator=torch.Generator().manual_seed(0))
    mosaics = tiles.repeat_interleave(2 * factor, 2).repeat_interleave(2 * factor, 3)
    return torch.cat([solid, torch.stack(patterns), mosaics]) * 2 - 1


@torch.no_grad()
def _fit_map(vae: Any, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fit of (latent pixel, 1) → mean colour of its f×f patch, over one encoded batch."""
    images = _fit_images(max(64, _LATENT_SIDE * factor), factor)
    encoded = float32_vae(vae, "cpu", encoder_only=True).encode(images)  # the VAE's own copy is left alone
    dist = getattr(encoded, "latent_dist", None)
    raw = dist.mean if dist is not None else getattr(encoded, "latents", encoded[0])
    z = scale_latents(
        raw.float().cpu(), latent_scaling(vae.config)
    )  # as the engine encodes (webui.engine.codec)
    target = F.avg_pool2d(images, factor)
    if target.shape[-2:] != z.shape[-2:]:  # a VAE that pads or crops: match the latent grid
        target = F.interpolate(target, size=z.shape[-2:], mode="area")
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y, driver="gelsd").solution
    solution = torch.nan_to_num(solution).float()
    return solution[:-1].contiguous(), solution[-1].contiguous()
