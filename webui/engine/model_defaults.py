"""A model's native size and recommended guidance, steps and sampler: the rules, shared by the loaded model and the reader.

:class:`~webui.engine.bundle.ModelBundle` answers ``default_size`` and ``default_cfg_scale`` with
these functions, and :func:`webui.engine.model_info.read_model_info` reads a model's files with
them, so the engine and the web UI never disagree about a model (see :mod:`webui.engine.model_info`
for the rules in words). Nothing here imports the rest of the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_CFG_SCALE",
    "DEFAULT_SIZE",
    "model_default_cfg",
    "model_default_sampler",
    "model_default_steps",
    "native_size",
    "vae_scale_factor",
]

DEFAULT_CFG_SCALE = 7.0  # what SD 1.x/2.x/SDXL are usually run with
DEFAULT_SIZE = 512  # SD 1.x, and SD 2.x at 512 pixels
XL_SIZE = 1024  # a model with two text encoders (SDXL) whose configs are not at hand
_MAX_SIZE = 16384  # pixels


def model_default_cfg(index: Mapping[str, Any]) -> float:
    """``defaults.cfg_scale`` of a ``model_index.json`` (a model's recommended guidance), else 7."""
    defaults = index.get("defaults")
    value = defaults.get("cfg_scale") if isinstance(defaults, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 100:
        return float(value)
    return DEFAULT_CFG_SCALE


def model_default_steps(index: Mapping[str, Any]) -> int | None:
    """``defaults.steps`` of a ``model_index.json`` (a few-step model's 4, say), else None."""
    defaults = index.get("defaults")
    value = defaults.get("steps") if isinstance(defaults, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000:
        return value
    return None


def model_default_sampler(index: Mapping[str, Any]) -> str | None:
    """``defaults.sampler`` of a ``model_index.json`` (a sampler's name, e.g. "LCM" or "Euler SGM
    Uniform"), else None. Whether the name is registered is the sampler registry's to say."""
    defaults = index.get("defaults")
    value = defaults.get("sampler") if isinstance(defaults, dict) else None
    if isinstance(value, str) and 0 < len(value.strip()) <= 64:
        return value.strip()
    return None


def vae_scale_factor(block_out_channels: Sequence[int]) -> int:
    """How many pixels one latent pixel covers along each side: ``2 ** (levels - 1)`` (8 for SD)."""
    return 2 ** (len(block_out_channels) - 1)


def native_size(
    settings: Mapping[str, Any],
    *,
    sample_size: Any = None,
    scale_factor: int | None = None,
    two_text_encoders: bool = False,
) -> int:
    """A model's native output side in pixels, first match wins: a declared ``default_size``; the
    UNet's ``sample_size`` times the VAE's ``scale_factor`` (96 × 8 = 768 for SD 2.x 768-v); 1024
    for a model with two text encoders (SDXL), else 512.

    ``settings`` is its ``model_index.json`` (or a bundle's ``config``), ``sample_size`` the UNet
    config's (an int, or a (height, width) pair whose larger side counts), ``scale_factor`` the
    VAE's downscale factor; ``two_text_encoders`` is the last resort's hint at SDXL.
    """
    declared = _size(settings.get("default_size"))
    if declared is not None:
        return declared
    if isinstance(sample_size, (list, tuple)) and sample_size:
        sample_size = max(sample_size)
    latent = _size(sample_size)
    if latent is not None and isinstance(scale_factor, int) and scale_factor > 0:
        return latent * scale_factor
    return XL_SIZE if two_text_encoders else DEFAULT_SIZE


def _size(value: Any) -> int | None:
    """``value`` as a positive whole number of pixels (``768``, ``768.0`` or ``"768"``), else None."""
    if isinstance(value, str):
        value = int(value.strip()) if value.strip().isdigit() else None
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_SIZE:
        return value
    return None
